"""A regular (non-editable) install finds the DeepSpeed templates: the wheel ships them, and the
lookup falls back from the source tree to <sys.prefix>/share/smf-ds/ds_configs."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from smf_ds.config import load_config
from smf_ds.train import ds_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.e2e
def test_the_wheel_ships_every_template(tmp_path):
    # Build from a copy: pip's build/ and egg-info stay out of the checkout.
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(ROOT / "setup.py", src)
    for folder in ("smf_ds", "ds_configs"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = tmp_path / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", "-w", str(out), str(src)], check=True, timeout=300)
    (wheel,) = out.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    templates = sorted(p.name for p in (ROOT / "ds_configs").glob("*.json"))
    assert templates
    for name in templates:
        assert f"smf_ds-0.1.0.data/data/share/smf-ds/ds_configs/{name}" in names, name
    # What a merged model directory copies, and lm-eval's task files.
    from smf_ds.memory.merged import PORTABLE_FILES

    assert {f"smf_ds/memory/portable/{name}" for name in PORTABLE_FILES} <= names
    tasks = sorted(p.name for p in (ROOT / "smf_ds" / "eval" / "lm_eval_tasks").glob("*.yaml"))
    assert len(tasks) == 4 and {f"smf_ds/eval/lm_eval_tasks/{name}" for name in tasks} <= names


def test_templates_come_from_the_source_tree_then_sys_prefix(tmp_path, monkeypatch):
    source, installed = tmp_path / "source", tmp_path / "prefix" / "share" / "smf-ds" / "ds_configs"
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "prefix"))
    assert ds_config.template_dirs()[1] == installed
    monkeypatch.setattr(ds_config, "template_dirs", lambda: [source, installed])

    installed.mkdir(parents=True)
    shutil.copy(ROOT / "ds_configs" / "zero0.json", installed)
    assert ds_config.template_path(0, False) == installed / "zero0.json"  # no source tree: the installed copy

    source.mkdir()
    shutil.copy(ROOT / "ds_configs" / "zero0.json", source)
    assert ds_config.template_path(0, False) == source / "zero0.json"  # the checkout wins

    cfg = load_config(None, ["train.zero_stage=2"])
    with pytest.raises(FileNotFoundError, match=rf"no DeepSpeed template zero2\.json; looked in {source}, {installed}"):
        ds_config.build_ds_config(cfg)


def test_the_checkout_finds_its_own_templates():
    assert ds_config.template_path(0, False) == ROOT / "ds_configs" / "zero0.json"
    assert ds_config.build_ds_config(load_config())["train_micro_batch_size_per_gpu"] == 4


@pytest.mark.e2e
@pytest.mark.parametrize("script", ["deepspeed.sh", "mpirun.sh", "slurm.sbatch"])
def test_launcher_usage_names_every_distributed_command(script):
    # retrofit trains, so it runs under the launchers like train
    done = subprocess.run(["bash", str(ROOT / "launch" / script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "{retrofit|train|background|eval|experiment}" in done.stderr, done.stderr


def test_deepspeed_launcher_documents_the_variables_it_reads():
    text = (ROOT / "launch" / "deepspeed.sh").read_text()
    header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
    assert "${DEEPSPEED:-" in text and "DEEPSPEED the launcher" in header
    assert "PYTHON the interpreter" not in header and "${PYTHON" not in text  # the launcher picks the Python


def test_the_readme_is_short_and_every_page_and_anchor_it_links_exists():
    """The README is a newcomer's ten minutes (about 150 lines); its links to docs, reports and
    figures, and the headings they point into, must exist."""
    import re

    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    targets = re.findall(r"\]\(([^)\s]+)\)", readme) + re.findall(r'src="([^"]+)"', readme)
    assert any(t.startswith("docs/") for t in targets)
    for target in targets:
        if "://" in target:
            continue
        path, _, anchor = target.partition("#")
        page = ROOT / (path or "README.md")
        assert page.exists(), f"README links {target}: no {path}"
        if anchor:
            prose = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)  # no '#' comment in a code block
            headings = re.findall(r"^#+ (.+)$", prose, flags=re.M)
            slugs = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}
            assert anchor in slugs, f"README links {target}: no heading {anchor!r} in {path}"
