"""No LoRA file in the test corpus gives a traceback: ``duolora inspect``, ``duolora merge`` (direct and ZipRank)
and the loaders' read either succeed or refuse in one line that names the file, and inspect's verdict is the
merge's. The corpus (``lorafiles.corpus``) holds one file of every kind the tests build or ship: the shipped
third-party fixtures and the synthetic files of every key style, spelling, scale, damage and adapter kind (the
loader nodes' walk over the same corpus, in the real ComfyUI, is in test_host_field_files.py).
"""

from __future__ import annotations

import contextlib
import io
import traceback
from pathlib import Path

import lorafiles as LF
import pytest

from duolora import cli
from duolora import formats as F
from duolora.inspect import inspect_file


def run_main(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("corpus")


@pytest.fixture(scope="module")
def corpus(folder: Path) -> dict[str, Path]:
    return LF.corpus(folder)


def one_line_refusal(err: str, path: Path) -> bool:
    """The whole stderr is one 'error: …' line naming the file."""
    return err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1 and path.name in err


def check(path: Path, out_dir: Path) -> list[str]:
    """What is wrong with how inspect, merge and the loaders' read treat ``path`` ([] when nothing is)."""
    problems = []
    code, _, err = run_main("inspect", str(path))
    # 0: a merge accepts it; 1: described, a merge would refuse it (said on stdout); 2: not readable, one line.
    if code not in (0, 1, 2) or (code == 2 and not one_line_refusal(err, path)) or (code in (0, 1) and err):
        problems.append(f"inspect exit {code}: {err!r}")
    inspect_error = err if code == 2 else None
    verdict = inspect_file(path)["for_merge"] if inspect_error is None else None
    try:
        lora = F.read_lora_for_merge(path)  # what Load Content/Style LoRA read
        F.one_line_summary(lora)
    except F.LoRAError as e:
        if inspect_error != f"error: {e}\n":
            problems.append(f"the loaders' read refuses with {e!s}, inspect with {inspect_error!r}")
    for method in ("direct", "ziprank"):
        out = out_dir / f"{method}.safetensors"
        code, _, err = run_main("merge", str(path), str(path), "-o", str(out), "--method", method, "--force",
                                "--quiet")
        if code not in (0, 2) or (code == 2 and not one_line_refusal(err, path)):
            problems.append(f"merge --method {method} exit {code}: {err!r}")
        if method == "direct":  # every file inspect accepts merges; every refusal is inspect's
            want = inspect_error or (f"error: {verdict}\n" if verdict else None)
            if (code == 0) != (want is None) or (want is not None and err != want):
                problems.append(f"merge {err!r} but inspect {want!r}")
        if code == 0:
            F.load_lora(out, F.merge_layout(out))  # the merged file reads back (with its family's table)
    return problems


def test_no_file_in_the_corpus_gives_a_traceback(corpus: dict[str, Path], folder: Path, tmp_path: Path) -> None:
    assert len(corpus) >= 110
    failures = {}
    for case, path in corpus.items():
        try:
            problems = check(path, tmp_path)
        except BaseException:  # noqa: BLE001 — a traceback is exactly what this test looks for
            problems = [traceback.format_exc()]
        if problems:
            failures[case] = problems
    assert failures == {}
    assert not list(folder.glob("unpickled_*"))  # the pickle files' tripwires: nothing was unpickled
