"""Where the project's non-Python assets live.

`model_repo_templates/` and `triton_backends/` sit at the top of the repository (kept out of the
package so operators can read and edit them). The gateway is installed editable (`make run`, `make test`), so
they are found relative to this package (`RenderOptions.templates_dir` can point elsewhere).
"""

from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TEMPLATES_DIR = PROJECT_ROOT / "model_repo_templates"
PYTHON_BACKENDS_DIR = PROJECT_ROOT / "triton_backends" / "python"
