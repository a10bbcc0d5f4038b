"""A table widget that redraws only the rows that changed.

Textual's ``DataTable`` drops every cached cell whenever any cell changes (its caches are
keyed by one update counter), so a console that updates a row a few times a second paid
for re-rendering every visible cell of three tables each time, on the event loop the
services of ``qflare simulate --tui`` share (benchmarks/console.py). ``RowTable`` keeps one
rendered line per row, keyed by the row's cells and the column widths: a changed row costs
one line, rows that only move (a new round on top) cost nothing but a restyle.

Rows are replaced wholesale with :meth:`RowTable.set_rows` (key, cells) in display order;
the table works out what changed. ``cursor=True`` shows a row cursor (``up``/``down``/
``pageup``/``pagedown``/``home``/``end``, a click) and posts :class:`RowTable.RowSelected`
on ``enter`` or a click on the cursor row. The cursor stays on the newest row (the top)
until the operator moves it; then it stays on that row's key as rows come and go.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual import events
from textual.binding import Binding, BindingType
from textual.geometry import Region, Size
from textual.message import Message
from textual.scroll_view import ScrollView
from textual.strip import Strip

Cell = str | Text
CELL_PADDING = 1


def as_text(cell: Cell) -> Text:
    """A cell as Rich text; a ``str`` is taken literally (never parsed as markup)."""
    return cell if isinstance(cell, Text) else Text(cell)


def same_cells(a: Sequence[Text], b: Sequence[Text]) -> bool:
    """Whether two rows would look the same (``Text.__eq__`` ignores the base style)."""
    return len(a) == len(b) and all(
        x.plain == y.plain and x.style == y.style and x.spans == y.spans
        for x, y in zip(a, b, strict=True)
    )


def make_line(cells: Sequence[Text], widths: Sequence[int]) -> Text:
    """One table line: each cell padded to its column's width, ``CELL_PADDING`` each side."""
    line = Text(no_wrap=True, end="")
    pad = " " * CELL_PADDING
    for cell, width in zip(cells, widths, strict=False):
        line.append(pad)
        if cell.cell_len > width:
            cell = cell.copy()
            cell.truncate(width)
        line.append_text(cell)
        line.append(" " * (width - cell.cell_len) + pad)
    return line


@dataclass(frozen=True, slots=True)
class _Styles:
    base: Style
    even: Style
    header: Style
    cursor: Style
    cursor_color: Style


class RowTable(ScrollView, can_focus=True):
    """Rows by key, each rendered once per change (see the module docstring)."""

    COMPONENT_CLASSES: ClassVar[set[str]] = {
        "rowtable--header",
        "rowtable--even-row",
        "rowtable--cursor",
    }
    # The look of Textual's DataTable, which this replaces.
    DEFAULT_CSS = """
    RowTable {
        background: $surface;
        color: $foreground;
        &:focus {
            background-tint: $foreground 5%;
            & > .rowtable--cursor {
                background: $block-cursor-background;
                color: $block-cursor-foreground;
                text-style: $block-cursor-text-style;
            }
            & > .rowtable--header {
                background-tint: $foreground 5%;
            }
        }
        &:dark {
            & > .rowtable--even-row {
                background: $surface-darken-1 40%;
            }
        }
        & > .rowtable--header {
            text-style: bold;
            background: $panel;
            color: $foreground;
        }
        & > .rowtable--even-row {
            background: $surface-lighten-1 50%;
        }
        & > .rowtable--cursor {
            background: $block-cursor-blurred-background;
            color: $block-cursor-blurred-foreground;
            text-style: $block-cursor-blurred-text-style;
        }
    }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("up", "cursor_up", "up", show=False),
        Binding("down", "cursor_down", "down", show=False),
        Binding("pageup", "cursor_page_up", "page up", show=False),
        Binding("pagedown", "cursor_page_down", "page down", show=False),
        Binding("home", "cursor_first", "first", show=False),
        Binding("end", "cursor_last", "last", show=False),
        Binding("enter", "select", "select", show=False),
    ]

    class RowSelected(Message):
        """``enter`` (or a click) on the cursor row."""

        def __init__(self, table: RowTable, key: str) -> None:
            super().__init__()
            self.table = table
            self.key = key

        @property
        def control(self) -> RowTable:
            return self.table

    def __init__(
        self,
        columns: Sequence[str],
        *,
        cursor: bool = False,
        id: str | None = None,
        classes: str | None = None,
    ) -> None:
        super().__init__(id=id, classes=classes)
        self.columns = tuple(columns)
        self.show_cursor = cursor
        self.cursor_row = 0
        self._pinned: str | None = None  # the key the operator put the cursor on
        self._keys: list[str] = []
        self._index: dict[str, int] = {}
        self._given: dict[str, Sequence[Cell]] = {}  # as passed in: unchanged if identical
        self._cells: dict[str, tuple[Text, ...]] = {}
        self._cell_widths: dict[str, tuple[int, ...]] = {}
        self._header = tuple(Text(label) for label in self.columns)
        self._widths = tuple(t.cell_len for t in self._header)
        self._lines: dict[str, Strip] = {}  # rendered rows for the current widths
        self._header_line: Strip | None = None
        self._style_cache: _Styles | None = None
        self.lines_rendered = 0  # rows rendered from their cells (not from the cache)

    # ---- data ----------------------------------------------------------------------
    @property
    def keys(self) -> list[str]:
        """Row keys in display order."""
        return list(self._keys)

    @property
    def row_count(self) -> int:
        return len(self._keys)

    @property
    def widths(self) -> tuple[int, ...]:
        return self._widths

    def get_row(self, key: str) -> tuple[Text, ...]:
        """The cells of row ``key`` (KeyError if there is none)."""
        return self._cells[key]

    @property
    def cursor_key(self) -> str | None:
        if not self.show_cursor or not self._keys:
            return None
        return self._keys[min(self.cursor_row, len(self._keys) - 1)]

    def set_rows(self, rows: Sequence[tuple[str, Sequence[Cell]]]) -> None:
        """Show ``rows`` (key, cells), in this order. Pass the same cells object for a row
        that did not change and it is not even compared."""
        keys = [key for key, _ in rows]
        changed: list[str] = []
        for key, cells in rows:
            if self._given.get(key) is cells:
                continue
            texts = tuple(as_text(c) for c in cells)
            self._given[key] = cells
            old = self._cells.get(key)
            if old is not None and same_cells(old, texts):
                continue
            self._cells[key] = texts
            self._cell_widths[key] = tuple(t.cell_len for t in texts)
            self._lines.pop(key, None)
            changed.append(key)
        moved = keys != self._keys
        if moved:
            wanted = set(keys)
            for gone in [k for k in self._keys if k not in wanted]:
                for store in (self._given, self._cells, self._cell_widths, self._lines):
                    store.pop(gone, None)
            self._keys = keys
            self._index = {key: i for i, key in enumerate(keys)}
        widths = self._column_widths() if changed or moved else self._widths
        resized = widths != self._widths
        if resized:
            self._widths = widths
            self._lines.clear()
            self._header_line = None
        self._set_virtual_size(Size(sum(w + 2 * CELL_PADDING for w in widths), len(keys) + 1))
        self._follow_cursor()
        if moved or resized:
            self.refresh()
        elif changed:
            self._refresh_rows([self._index[k] for k in changed])

    def _set_virtual_size(self, size: Size) -> None:
        """A new virtual size without a layout pass (which repaints the whole screen) when
        the scrollbars stay as they are, the way Textual updates it after a resize."""
        old = self.virtual_size
        if size == old:
            return
        view = self.scrollable_content_region.size
        same_bars = (old.height > view.height) == (size.height > view.height) and (
            old.width > view.width
        ) == (size.width > view.width)
        # Widget's own helper for this (Textual 5 to 8); without it, a plain assignment
        scroll_update = getattr(self, "_scroll_update", None)
        if same_bars and self.is_mounted and callable(scroll_update):
            self.set_reactive(RowTable.virtual_size, size)
            scroll_update(size)
        else:
            self.virtual_size = size

    def _column_widths(self) -> tuple[int, ...]:
        header = tuple(t.cell_len for t in self._header)
        rows = [self._cell_widths[k] for k in self._keys]
        return tuple(max(col) for col in zip(header, *rows, strict=False))

    # ---- cursor --------------------------------------------------------------------
    def _follow_cursor(self) -> None:
        if not self.show_cursor:
            return
        index = self._index.get(self._pinned) if self._pinned is not None else None
        if index is None:
            self._pinned = None
            index = 0
        if index != self.cursor_row:
            self.cursor_row = index
            self._scroll_to_cursor()

    def move_cursor(self, row: int) -> None:
        """Put the cursor on ``row`` (clamped); on any row but the top it stays with that
        row's key as rows are added above it."""
        if not self.show_cursor or not self._keys:
            return
        row = max(0, min(row, len(self._keys) - 1))
        old, self.cursor_row = self.cursor_row, row
        self._pinned = self._keys[row] if row > 0 else None
        self._refresh_rows([old, row])
        self._scroll_to_cursor()

    def _visible_rows(self) -> int:
        return max(1, self.scrollable_content_region.height - 1)

    def _scroll_to_cursor(self) -> None:
        top = round(self.scroll_y)
        visible = self._visible_rows()
        if self.cursor_row < top:
            self.scroll_to(y=self.cursor_row, animate=False)
        elif self.cursor_row >= top + visible:
            self.scroll_to(y=self.cursor_row - visible + 1, animate=False)

    def action_cursor_up(self) -> None:
        if self.show_cursor:
            self.move_cursor(self.cursor_row - 1)
        else:
            self.scroll_up(animate=False)

    def action_cursor_down(self) -> None:
        if self.show_cursor:
            self.move_cursor(self.cursor_row + 1)
        else:
            self.scroll_down(animate=False)

    def action_cursor_page_up(self) -> None:
        if self.show_cursor:
            self.move_cursor(self.cursor_row - self._visible_rows())
        else:
            self.scroll_page_up(animate=False)

    def action_cursor_page_down(self) -> None:
        if self.show_cursor:
            self.move_cursor(self.cursor_row + self._visible_rows())
        else:
            self.scroll_page_down(animate=False)

    def action_cursor_first(self) -> None:
        if self.show_cursor:
            self.move_cursor(0)
        self.scroll_home(animate=False)

    def action_cursor_last(self) -> None:
        if self.show_cursor:
            self.move_cursor(len(self._keys) - 1)
        else:
            self.scroll_end(animate=False)

    def action_select(self) -> None:
        key = self.cursor_key
        if key is not None:
            self.post_message(self.RowSelected(self, key))

    def on_click(self, event: events.Click) -> None:
        offset = event.get_content_offset(self)
        if offset is None or offset.y < 1 or not self.show_cursor:
            return
        row = round(self.scroll_y) + offset.y - 1
        if row >= len(self._keys):
            return
        if row == self.cursor_row:
            self.action_select()
        else:
            self.move_cursor(row)

    # ---- drawing -------------------------------------------------------------------
    def _refresh_rows(self, indexes: Sequence[int]) -> None:
        top = round(self.scroll_y)
        height = self.scrollable_content_region.height
        width = max(self.virtual_size.width, self.size.width)
        for index in indexes:
            y = index + 1 - top
            if 1 <= y < height:
                self.refresh(Region(0, y, width, 1))

    def _row_line(self, key: str) -> Strip:
        line = self._lines.get(key)
        if line is None:
            text = make_line(self._cells[key], self._widths)
            line = self._lines[key] = Strip(list(text.render(self.app.console)), text.cell_len)
            self.lines_rendered += 1
        return line

    def _styles(self) -> _Styles:
        if self._style_cache is None:
            base = self.rich_style
            cursor = self.get_component_rich_style("rowtable--cursor")
            self._style_cache = _Styles(
                base=base,
                even=base + self.get_component_rich_style("rowtable--even-row"),
                header=base + self.get_component_rich_style("rowtable--header"),
                cursor=cursor,
                cursor_color=Style(color=cursor.color),
            )
        return self._style_cache

    def render_line(self, y: int) -> Strip:
        scroll_x, scroll_y = self.scroll_offset
        width = self.size.width
        styles = self._styles()
        if y == 0:
            if self._header_line is None:
                text = make_line(self._header, self._widths)
                self._header_line = Strip(list(text.render(self.app.console)), text.cell_len)
            strip = self._header_line.apply_style(styles.header)
            return strip.crop_extend(scroll_x, scroll_x + width, styles.header)
        index = scroll_y + y - 1
        if index >= len(self._keys):
            return Strip.blank(width, styles.base)
        style = styles.even if index % 2 == 0 else styles.base
        line = self._row_line(self._keys[index])
        if self.show_cursor and index == self.cursor_row:
            # as DataTable draws its cursor: under the cells, but in the cursor's colour
            style = style + styles.cursor
            strip = Strip(Segment.apply_style(line, style, styles.cursor_color), line.cell_length)
        else:
            strip = line.apply_style(style)
        return strip.crop_extend(scroll_x, scroll_x + width, style)

    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._style_cache = None
        self.refresh()

    def _on_resize(self, _: events.Resize) -> None:
        if self.show_cursor:
            self._scroll_to_cursor()
