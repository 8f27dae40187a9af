"""Re-execute notebooks in place so their stored outputs match the code (nbval compares them in `make test`).

    .venv/bin/python notebooks/refresh.py                 # every notebook here
    .venv/bin/python notebooks/refresh.py 00_quickstart   # one

Cells tagged `strip-output` (e.g. `hv.extension(..., inline=True)`, whose output is megabytes of BokehJS)
are executed but stored without outputs.
"""

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def refresh(path: Path) -> None:
    # widget state is not stored: widget cells keep no outputs (strip-output), so it would only be churn
    subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute", "--inplace",
                    "--ExecutePreprocessor.store_widget_state=False", str(path)], check=True, cwd=HERE)
    notebook = json.loads(path.read_text())
    for cell in notebook["cells"]:
        if "strip-output" in cell.get("metadata", {}).get("tags", []):
            cell["outputs"] = []
    path.write_text(json.dumps(notebook, indent=1, ensure_ascii=False) + "\n")
    print(f"refreshed {path.name}")


if __name__ == "__main__":
    names = sys.argv[1:] or [p.stem for p in sorted(HERE.glob("*.ipynb"))]
    for name in names:
        refresh(HERE / f"{Path(name).stem}.ipynb")
