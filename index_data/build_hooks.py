"""Build hook (named in pyproject.toml's `cmdclass`): what of index_data/ goes into a wheel.

index_data/ is installed as the package `retrieval.bundled` (its `package-dir`), for the model
and the demo it holds; setuptools would also copy every ``*.py`` of that folder, so this keeps
only the package's empty ``__init__.py`` and leaves the scripts that made the data behind.
"""

from __future__ import annotations

from setuptools.command.build_py import build_py

BUNDLED_PACKAGE = "retrieval.bundled"


class BuildPy(build_py):
    """setuptools' build_py, without the scripts of index_data/."""

    def find_package_modules(self, package: str, package_dir: str) -> list[tuple[str, str, str]]:
        """The modules of `package`: all of them, except for `retrieval.bundled` only its `__init__`."""
        modules = super().find_package_modules(package, package_dir)
        if package == BUNDLED_PACKAGE:
            return [m for m in modules if m[1] == "__init__"]
        return modules
