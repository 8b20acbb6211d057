"""The commands README.md and docs/*.md tell people to type still work.

The commands are read from the documents themselves, so a test fails as soon as
a document is edited into something that does not run.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import kedro.framework.project
import numpy as np
import pytest

from tests.conftest import PROJECT_ROOT, load_params
from tests.servers import background_server, free_port

DOCUMENTS = [PROJECT_ROOT / "README.md", *sorted((PROJECT_ROOT / "docs").glob("*.md"))]


def kedro_run_commands(text: str) -> list[str]:
    """Every `kedro run ...` in ``text``: to the end of its line (backslash continuations joined), a closing
    backtick or quote, or a shell comment."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [" ".join(match.split()) for match in re.findall(r"kedro run\b[^`'\n#]*", joined)]


def documented_kedro_runs() -> list[tuple[str, str]]:
    return [
        (f"{path.relative_to(PROJECT_ROOT)}", command)
        for path in DOCUMENTS
        for command in kedro_run_commands(path.read_text())
    ]


def options(command: str) -> dict[str, list[str]]:
    """``--name=value`` and ``--name value`` options of a command, by name."""
    found: dict[str, list[str]] = {}
    words = shlex.split(command)
    for index, word in enumerate(words):
        if not word.startswith("--"):
            continue
        name, equals, value = word.partition("=")
        if not equals and index + 1 < len(words) and not words[index + 1].startswith("-"):
            value = words[index + 1]
        found.setdefault(name, []).append(value)
    return found


def is_placeholder(value: str) -> bool:
    """Prose stands-ins such as `--pipelines=<stage>` or `--params=...`."""
    return value.startswith("<") or "..." in value


def registered_pipeline_names(monkeypatch) -> set[str]:
    from muco_flow.pipeline_registry import register_pipelines

    # what `kedro run` sets from pyproject.toml before it asks the registry
    monkeypatch.setattr(kedro.framework.project, "PACKAGE_NAME", "muco_flow")
    return set(register_pipelines())


def test_the_parser_finds_commands_in_code_blocks_inline_and_across_continued_lines():
    text = (
        "Run `kedro run --pipelines=sample`, then\n```bash\nkedro run --pipelines=train --params=a=1   # two CPUs\n"
        "srun bash -c 'kedro run --env cluster --pipelines=data,train \\\n    --params=b=2'\n```\n"
    )
    commands = kedro_run_commands(text)
    assert commands == [
        "kedro run --pipelines=sample",
        "kedro run --pipelines=train --params=a=1",
        "kedro run --env cluster --pipelines=data,train --params=b=2",
    ]
    assert options(commands[2]) == {"--env": ["cluster"], "--pipelines": ["data,train"], "--params": ["b=2"]}


def test_the_documents_hold_kedro_run_commands():
    """The checks below would pass vacuously if the parser found nothing."""
    commands = documented_kedro_runs()
    assert len(commands) >= 20, commands
    manuals = {
        "docs/cluster.md",
        "docs/data.md",
        "docs/dvc.md",
        "docs/evaluation.md",
        "docs/registry.md",
        "docs/training.md",
    }
    assert {doc for doc, _ in commands} >= {"README.md", *manuals}


def test_every_documented_kedro_run_names_registered_pipelines_with_the_current_flag(monkeypatch):
    registered = registered_pipeline_names(monkeypatch)
    assert {"sample", "data", "train", "evaluate", "register", "promote", "__default__"} <= registered
    wrong = []
    for doc, command in documented_kedro_runs():
        given = options(command)
        if "--pipeline" in given:
            wrong.append(f"{doc}: `{command}` uses --pipeline, which Kedro 1.7 deprecates (--pipelines)")
        for value in given.get("--pipelines", []):
            if is_placeholder(value):
                continue
            unknown = [name for name in value.split(",") if name not in registered]
            if unknown:
                wrong.append(f"{doc}: `{command}` names {unknown}, not among {sorted(registered)}")
    assert not wrong, "\n".join(wrong)


def runtime_param_names(env: str) -> set[str]:
    """Keys the configuration of ``env`` reads with ``${runtime_params:KEY}``: set by --params, not parameters."""
    files = [*(PROJECT_ROOT / "conf/base").glob("*.yml"), *(PROJECT_ROOT / "conf" / env).glob("*.yml")]
    return {key for path in files for key in re.findall(r"\$\{runtime_params:([\w.]+)", path.read_text())}


def is_parameter(params: dict, key: str) -> bool:
    node: object = params
    for part in key.split("."):
        if not (isinstance(node, dict) and part in node):
            return False
        node = node[part]
    return True


def test_every_documented_kedro_run_uses_an_existing_env_and_known_parameters():
    """`--params` with a misspelt key runs without complaint and changes nothing: check the keys exist."""
    wrong = []
    configuration = functools.cache(lambda env: (load_params(env), runtime_param_names(env)))  # per env, not command
    for doc, command in documented_kedro_runs():
        given = options(command)
        env = given.get("--env", ["base"])[-1]
        if not (PROJECT_ROOT / "conf" / env).is_dir():
            wrong.append(f"{doc}: `{command}` names env {env!r}, which has no conf/{env}")
            continue
        params, runtime = configuration(env)
        for assignment in ",".join(given.get("--params", [])).split(","):
            key = assignment.partition("=")[0]
            if key and not is_placeholder(key) and key not in runtime and not is_parameter(params, key):
                wrong.append(f"{doc}: `{command}` sets {key!r}, not a parameter or runtime_params key of {env!r}")
    assert not wrong, "\n".join(wrong)


# ---------------------------------------------------------------- links between the documents and the first screen


def heading_anchors(text: str) -> set[str]:
    """The anchors GitHub gives a document's headings: lower case, every character but letters, digits, `_`, `-`
    and spaces dropped, spaces turned into `-`; a repeated heading gets `-1`, `-2`, ... Lines in fenced code
    (`#SBATCH`, shell comments) are not headings."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE)
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for title in re.findall(r"^#{1,6} +(.+?)\s*$", prose, re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        anchors.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def relative_links(text: str) -> list[str]:
    """Targets of Markdown links outside fenced code that point into the repository (not to a web address)."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE)
    return [target for target in re.findall(r"\]\(([^)\s]+)\)", prose) if not re.match(r"[a-z]+:", target)]


def test_heading_anchors_are_githubs():
    text = (
        "# Training\n## Stage 2: fine-tuning (`finetune`)\n## 6. Training input at realistic sizes (`training_input`)\n"
        "### M-BEIR, as UniIR evaluates it\n## Notes\n```bash\n#SBATCH --nodes=4\n# a comment\n```\n## Notes\n"
        "Not a heading: #hashtag\n"
    )
    assert heading_anchors(text) == {
        "training",
        "stage-2-fine-tuning-finetune",
        "6-training-input-at-realistic-sizes-training_input",
        "m-beir-as-uniir-evaluates-it",
        "notes",
        "notes-1",
    }
    assert relative_links("[a](docs/a.md#x), [web](https://example.org), [b](#y)\n```\n[c](z.md)\n```") == [
        "docs/a.md#x",
        "#y",
    ]


def test_every_link_between_the_documents_reaches_a_file_and_a_heading():
    links = [(path, target) for path in DOCUMENTS for target in relative_links(path.read_text())]
    assert len(links) >= 30, links  # the check below would pass vacuously if the parser found none
    broken = []
    for path, target in links:
        file, _, anchor = target.partition("#")
        linked = (path.parent / file) if file else path
        where = f"{path.relative_to(PROJECT_ROOT)}: ({target})"
        if not linked.exists():
            broken.append(f"{where}: no file {file}")
        elif anchor and anchor not in heading_anchors(linked.read_text()):
            broken.append(f"{where}: no heading with anchor #{anchor} in {file or path.name}")
    assert not broken, "\n".join(broken)


def test_the_readmes_first_screen_says_what_muco_flow_is_the_two_commands_and_the_pipelines():
    first_screen = "\n".join((PROJECT_ROOT / "README.md").read_text().splitlines()[:45])
    for needed in (
        "https://arxiv.org/abs/",
        "https://github.com/naver-ai/muco",
        "make run",
        "make test",
        "| `train` |",
    ):
        assert needed in first_screen, f"README.md's first 45 lines lack {needed!r}"


def code_map() -> str:
    """The README's code map: the code block under its "Code map" heading."""
    readme = (PROJECT_ROOT / "README.md").read_text()
    return re.search(r"## Code map\n+```\n(.*?)```", readme, re.DOTALL).group(1)


def code_map_modules() -> set[str]:
    """The module paths the code map names; a bare file name stands in the folder of its line's first path
    ("evaluation/retrieval.py ...; metrics.py: ..." names evaluation/metrics.py)."""
    named = set()
    for line in code_map().splitlines():
        paths = re.findall(r"[\w/]+\.py", line)
        folder = paths[0].rpartition("/")[0] if paths else ""
        named |= {path if "/" in path or not folder else f"{folder}/{path}" for path in paths}
    return named


def test_the_code_map_names_every_library_module():
    """A module added, renamed or moved without a line in the code map fails here (pipelines/ is one line,
    packages' __init__.py files are optional)."""
    named = code_map_modules()
    library = PROJECT_ROOT / "src" / "muco_flow"
    missing = [
        path
        for path in sorted(module.relative_to(library).as_posix() for module in library.rglob("*.py"))
        if not path.startswith("pipelines/") and not path.endswith("__init__.py") and path not in named
    ]
    assert not missing, f"README.md's code map does not name: {', '.join(missing)}"


# ---------------------------------------------------------------- load by alias, serve and curl (slow)


SERVING_DOCUMENT = PROJECT_ROOT / "docs" / "registry.md"


def serving_block() -> str:
    """The registry manual's bash block that loads the registered model by alias and serves it."""
    blocks = re.findall(r"```bash\n(.*?)```", SERVING_DOCUMENT.read_text(), re.DOTALL)
    found = [block for block in blocks if "mlflow models serve" in block and "load_model" in block]
    assert len(found) == 1, (
        f"{SERVING_DOCUMENT.name} should have one bash block that loads by alias and serves the model"
    )
    return found[0]


def shell_lines(block: str) -> list[str]:
    """The block's commands, backslash continuations joined."""
    return [line.strip() for line in re.sub(r"\\\n\s*", " ", block).splitlines() if line.strip()]


@pytest.fixture
def registered_project(model_dir, tmp_path, monkeypatch) -> Path:
    """A project folder as `make run` leaves it: mlflow.db with the conf's model name at alias `challenger`,
    and `.venv` (the running interpreter's environment)."""
    from mlflow.tracking import MlflowClient

    from muco_flow.registry.registration import register_model_version

    project = tmp_path / "project"
    project.mkdir()
    (project / ".venv").symlink_to(Path(sys.executable).parent.parent)
    monkeypatch.chdir(project)  # MLflow's local artifact root is relative to the working directory
    uri = f"sqlite:///{project / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("muco-flow"))
    name = load_params()["registry"]["model_name"]
    register_model_version(uri, name=name, run_id=run.info.run_id, model_dir=str(model_dir), tags={})
    return project


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_documented_block_loads_the_registered_model_by_alias_and_serves_it(registered_project, model_dir):
    from muco_flow.modeling.backbone import load_backbone

    lines = shell_lines(serving_block())
    exports = [line for line in lines if line.startswith("export ")]
    one_liner = next(line for line in lines if "load_model" in line)
    serve = next(line for line in lines if "mlflow models serve" in line)
    curl = next(line for line in lines if line.startswith("curl "))
    assert serve.endswith("&"), "the block starts the server in the background, then calls it"
    port = re.search(r"(?:-p|--port)[ =](\d+)", serve).group(1)
    assert f":{port}/invocations" in curl, f"curl calls another port than the server's {port}"
    # the documented port, swapped for a free one so that parallel test runs do not collide
    here = str(free_port())
    serve, curl = serve.replace(port, here), curl.replace(f":{port}/", f":{here}/")

    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    prelude = "\n".join(exports) + "\n"

    def bash(command: str) -> str:
        result = subprocess.run(
            ["bash", "-c", prelude + command], cwd=registered_project, env=env, capture_output=True, text=True,
            timeout=600,
        )  # fmt: skip
        assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
        return result.stdout

    hidden = load_backbone(str(model_dir)).model.config.text_config.hidden_size
    assert bash(one_liner).strip().splitlines()[-1] == f"(1, {hidden})"

    # the serve line as written, less its `&`: background_server holds it until the block ends
    script = prelude + serve.removesuffix("&").strip()
    log = registered_project / "serve.log"
    with background_server(["bash", "-c", script], f"http://127.0.0.1:{here}/ping", timeout_s=300, log=log):
        answer = json.loads(bash(curl))
    vectors = np.array(answer["predictions"])
    assert vectors.shape == (1, hidden), answer
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
