"""The research extra: what the service image leaves out, and the error a command gives without it.

Why: matplotlib and pynrrd are out of the service's dependencies (about 75 MB of the image). A gateway
or worker code path that starts importing them again would break the image at run time, so the service's
modules are imported in a fresh interpreter that cannot find them; and a research command run where they
are missing must say which extra to install.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from models.extras import require

REPO = Path(__file__).resolve().parent.parent

# A meta-path finder that refuses the research extra's modules, as an installation without it would.
WITHOUT_RESEARCH = """
import importlib.abc, sys
class NoResearch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("matplotlib", "nrrd"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, NoResearch())
"""


def test_the_gateway_and_the_worker_import_without_the_research_extra() -> None:
    code = WITHOUT_RESEARCH + (
        "import btd.cli, btd.commands, service.server, service.api.app, service.heatmap, worker.celery_app\n"
        "import worker.tasks, worker.pipeline, worker.report_tasks, worker.main, models.detector\n"
        "assert not any(m.partition('.')[0] in ('matplotlib', 'nrrd') for m in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_a_research_command_without_the_extra_names_it() -> None:
    code = WITHOUT_RESEARCH + (
        "from models.evaluate import plot_roc\n"
        "plot_roc({'a': ([0.1, 0.9], [0, 1])}, '/nonexistent/roc.png')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "pip install 'btd[research]'" in done.stderr, done.stderr[-2000:]


def test_require_returns_the_module_and_keeps_a_broken_librarys_own_error(tmp_path: Path) -> None:
    assert require("json", "testing").dumps([1]) == "[1]"
    with pytest.raises(ModuleNotFoundError, match=r"btd\[research\]"):
        require("no_such_module_for_btd", "testing")
    broken = tmp_path / "broken_lib_for_btd"
    broken.mkdir()
    (broken / "__init__.py").write_text("import a_dependency_that_is_missing\n")
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(ModuleNotFoundError, match="a_dependency_that_is_missing") as caught:
            require("broken_lib_for_btd", "testing")
        assert "btd[research]" not in str(caught.value)
    finally:
        sys.path.remove(str(tmp_path))
