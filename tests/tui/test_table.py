"""RowTable: rows are rendered once per change, moved rows come from the cache, and the
cursor follows the newest row until the operator moves it."""

from __future__ import annotations

from rich.text import Text
from textual.app import App, ComposeResult

from qflare.tui.table import RowTable, make_line, same_cells


class TableApp(App[None]):
    def __init__(self, cursor: bool = False) -> None:
        super().__init__()
        self.cursor = cursor
        self.selected: list[str] = []

    def compose(self) -> ComposeResult:
        yield RowTable(("key", "value"), cursor=self.cursor, id="t")

    def on_row_table_row_selected(self, message: RowTable.RowSelected) -> None:
        self.selected.append(message.key)


def rows(n: int, start: int = 0) -> list[tuple[str, tuple[str, ...]]]:
    """Newest first: row ``start + n - 1`` on top."""
    return [(f"r{i}", (f"r{i}", f"value {i}")) for i in reversed(range(start, start + n))]


def shown(table: RowTable) -> list[str]:
    """The lines the table draws (header first), as text."""
    return [table.render_line(y).text.rstrip() for y in range(table.size.height)]


def test_make_line_pads_every_cell_to_its_column() -> None:
    line = make_line((Text("a"), Text("bbb", "red")), (3, 4))
    assert line.plain == " a    bbb  "
    assert line.spans[0].style == "red"


def test_same_cells_sees_a_changed_style() -> None:
    assert same_cells((Text("1", "green"),), (Text("1", "green"),))
    assert not same_cells((Text("1", "green"),), (Text("1", "red"),))  # Text.__eq__ says equal


async def test_only_changed_rows_are_rendered_again() -> None:
    app = TableApp()
    async with app.run_test(size=(40, 12)) as pilot:
        table = app.query_one(RowTable)
        data = rows(30)
        table.set_rows(data)
        await pilot.pause()
        first = table.lines_rendered
        assert first == table.size.height - 1  # the visible rows, once each
        assert shown(table)[1].startswith(" r29")

        # one row changes (same widths): one line is rendered
        data[0] = ("r29", ("r29", "value ok"))
        table.set_rows(data)
        await pilot.pause()
        assert table.lines_rendered == first + 1
        assert "value ok" in shown(table)[1]

        # the same rows again (new but equal cells): nothing is rendered
        table.set_rows([(k, tuple(c)) for k, c in data])
        await pilot.pause()
        assert table.lines_rendered == first + 1

        # a new row on top: the others move, only the new one is rendered
        table.set_rows([("r30", ("r30", "value 30")), *data])
        await pilot.pause()
        assert table.lines_rendered == first + 2
        assert [line[:4] for line in shown(table)[1:4]] == [" r30", " r29", " r28"]

        # a wider cell: the columns change, so every visible row is rendered again
        table.set_rows([("r30", ("r30", "value thirty")), *data])
        await pilot.pause()
        assert table.lines_rendered == first + 2 + table.size.height - 1


async def test_without_cursor_new_rows_stay_in_view() -> None:
    """The view stays on the newest rows however many arrive (the rounds panel used to
    scroll after a DataTable cursor that stuck to the first row it was on)."""
    app = TableApp()
    async with app.run_test(size=(40, 8)) as pilot:
        table = app.query_one(RowTable)
        for n in range(1, 40):
            table.set_rows(rows(n))
            await pilot.pause()
        assert table.scroll_y == 0
        assert shown(table)[1].startswith(" r38")


async def test_cursor_follows_the_newest_row_until_moved() -> None:
    app = TableApp(cursor=True)
    async with app.run_test(size=(40, 8)) as pilot:
        table = app.query_one(RowTable)
        table.focus()
        table.set_rows(rows(3))
        await pilot.pause()
        assert table.cursor_key == "r2"
        table.set_rows(rows(4))  # not moved: the cursor stays on top, on the new row
        assert table.cursor_key == "r3"

        await pilot.press("down")  # the operator picks r2: it stays picked
        assert table.cursor_key == "r2"
        for n in range(5, 30):
            table.set_rows(rows(n))
            await pilot.pause()
        assert table.cursor_key == "r2"
        assert table.cursor_row == 26
        await pilot.press("enter")
        assert app.selected == ["r2"]

        await pilot.press("home")  # back on top: following the newest again
        table.set_rows(rows(31))
        assert table.cursor_key == "r30"
        assert table.scroll_y == 0

        table.set_rows(rows(5, start=100))  # the picked row is gone: back to the top
        assert table.cursor_key == "r104"


async def test_a_click_moves_the_cursor_and_a_second_click_selects() -> None:
    app = TableApp(cursor=True)
    async with app.run_test(size=(40, 8)) as pilot:
        table = app.query_one(RowTable)
        table.set_rows(rows(5))
        await pilot.pause()
        await pilot.click(RowTable, offset=(2, 3))  # line 3: the third row (r2)
        assert table.cursor_key == "r2" and app.selected == []
        await pilot.click(RowTable, offset=(2, 3))
        assert app.selected == ["r2"]
