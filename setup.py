"""Package mapping: the top-level folders messages/, crypto/, services/ and tui/ are
installed as subpackages of ``qflare`` (docs/architecture.md, "Layout")."""

from setuptools import find_packages, setup

MAPPED = {
    "messages": "qflare.messages",
    "crypto": "qflare.crypto",
    "services": "qflare.services",
    "tui": "qflare.tui",
}

packages = find_packages(include=["qflare", "qflare.*"])
package_dir = {"qflare": "qflare"}
for folder, name in MAPPED.items():
    package_dir[name] = folder
    packages.append(name)
    for sub in find_packages(where=folder):
        packages.append(f"{name}.{sub}")

setup(packages=packages, package_dir=package_dir)
