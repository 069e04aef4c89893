"""Build step that pyproject.toml cannot express: put ``ultralytics_dp.pth`` in site-packages.

Python runs an ``import`` line of a ``.pth`` file at start-up (the mechanism coverage and
pytest-cov use); ours imports ``ultralytics_dp``, which registers the import hooks that give the
stock ``yolo`` command the DP keys (``ultralytics_dp/plugin.py``). The line does nothing if the
package is gone (a ``.pth`` left behind after uninstall). Wheels get the file from ``build_lib``;
editable installs (PEP 660) write it into the editable wheel's root, where setuptools' own
``.pth`` goes.
"""

from pathlib import Path

from setuptools import Command, setup
from setuptools.command.build import build

PTH = "ultralytics_dp.pth"
LINE = 'import importlib.util as u; u.find_spec("ultralytics_dp") and __import__("ultralytics_dp")\n'


class build_pth(Command):
    """Write ``ultralytics_dp.pth`` where the wheel's top-level files go."""

    description = "write the ultralytics_dp.pth start-up file"
    user_options: list = []

    def initialize_options(self) -> None:
        self.build_lib = None
        self.editable_mode = False

    def finalize_options(self) -> None:
        self.set_undefined_options("build_py", ("build_lib", "build_lib"))

    def run(self) -> None:
        root = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        Path(root).mkdir(parents=True, exist_ok=True)
        Path(root, PTH).write_text(LINE)

    def get_outputs(self) -> list[str]:
        return [str(Path(self.build_lib, PTH))]

    def get_source_files(self) -> list[str]:
        return []


class build_with_pth(build):
    sub_commands = [*build.sub_commands, ("build_pth", None)]


setup(cmdclass={"build": build_with_pth, "build_pth": build_pth})
