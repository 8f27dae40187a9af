"""The repository's kernels/ and datasets/ folders must never shadow the PyPI packages of the same names."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import workbench.kernels

ROOT = Path(__file__).resolve().parent.parent


def test_kernels_import_as_workbench_kernels():
    assert Path(workbench.kernels.__file__).resolve() == ROOT / "kernels" / "__init__.py"


def test_top_level_names_are_not_taken():
    for name in ("kernels", "datasets"):
        spec = importlib.util.find_spec(name)
        assert spec is None or not str(spec.origin or "").startswith(str(ROOT)), name
    assert not (ROOT / "datasets" / "__init__.py").exists()


def test_from_another_directory_a_fresh_interpreter_sees_no_repo_kernels(tmp_path):
    code = "import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else None)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert str(ROOT) not in out.stdout
