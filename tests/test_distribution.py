"""What the Comfy Registry and ComfyUI-Manager read from the repository: pyproject.toml, requirements.txt,
LICENSE, the icon, and the README's picture and install section. Plain file checks, no ComfyUI.

Registry rules (docs.comfy.org/registry/specifications): ``[project] name`` < 100 characters, only
alphanumerics and ``- _ .``, no two special characters in a row, starting with neither a digit nor a special
character, and (their advice) without "ComfyUI"; ``version`` is X.Y.Z; ``license`` is ``{file = ...}`` or
``{text = ...}``; ``[project.urls] Repository`` is required; ``[tool.comfy]`` holds PublisherId,
DisplayName and Icon.
"""

from __future__ import annotations

import fnmatch
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import tomllib
from PIL import Image

import duolora

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
README = (REPO / "README.md").read_text(encoding="utf-8")
# What ComfyUI itself installs (its requirements.txt); the pack must never pin these.
COMFY_PROVIDES = ("torch", "torchvision", "torchaudio", "numpy", "pillow", "safetensors")
NAME_RE = re.compile(r"^[A-Za-z](?:[A-Za-z0-9]|[-_.](?=[A-Za-z0-9]))*$")


def _requirement_name(line: str) -> str:
    return re.split(r"[\s\[<>=!~;@]", line, maxsplit=1)[0].lower().replace("_", "-")


def _requirement_lines(path: Path) -> list[str]:
    lines = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            lines.append(line)
    return lines


def test_registry_name_rules() -> None:
    name = PYPROJECT["project"]["name"]
    assert name == "duolora"
    assert len(name) < 100 and NAME_RE.fullmatch(name), name
    assert "comfyui" not in name.lower()
    # The rule itself, on the registry documentation's own good and bad examples.
    assert [bool(NAME_RE.fullmatch(n)) for n in ("image-processor", "super-resolution", "123-tool", "a--b",
                                                  "-tool", "tool.", "x_y.z")] == [True, True, False, False,
                                                                                  False, False, True]


def test_version_is_semver_and_matches_the_package_and_the_web_extension() -> None:
    version = PYPROJECT["project"]["version"]
    assert re.fullmatch(r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)", version), version
    assert version == duolora.__version__
    js = (REPO / "web" / "duolora.js").read_text(encoding="utf-8")
    assert re.search(r'const VERSION = "([^"]+)";', js).group(1) == version


def test_license_is_the_gpl3_file() -> None:
    project = PYPROJECT["project"]
    assert project["license"] == {"file": "LICENSE"}
    text = (REPO / "LICENSE").read_text(encoding="utf-8")
    head = [line.strip() for line in text.splitlines()[:3]]
    assert head[:2] == ["GNU GENERAL PUBLIC LICENSE", "Version 3, 29 June 2007"]
    assert "END OF TERMS AND CONDITIONS" in text and len(text) > 30_000  # the whole licence, not a stub
    assert "License :: OSI Approved :: GNU General Public License v3 (GPLv3)" in project["classifiers"]


def test_description_urls_and_tool_comfy() -> None:
    project = PYPROJECT["project"]
    assert isinstance(project["description"], str) and 20 <= len(project["description"]) <= 300
    repository = project["urls"]["Repository"]
    match = re.fullmatch(r"https://github\.com/([\w.-]+)/([\w.-]+)", repository)
    assert match, repository
    comfy = PYPROJECT["tool"]["comfy"]
    assert set(comfy) >= {"PublisherId", "DisplayName", "Icon"}
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", comfy["PublisherId"]), comfy["PublisherId"]
    assert comfy["DisplayName"].strip() and "DuoLoRA" in comfy["DisplayName"]
    # The icon is the repository's own web/icon.svg, served raw from the default branch.
    owner, repo = match.groups()
    assert comfy["Icon"] == f"https://raw.githubusercontent.com/{owner}/{repo}/main/web/icon.svg"


def test_icon_file_is_a_square_svg() -> None:
    icon = REPO / "web" / "icon.svg"
    root = ET.parse(icon).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    x, y, w, h = (float(v) for v in root.attrib["viewBox"].split())
    assert (x, y) == (0.0, 0.0) and w == h > 0
    assert float(root.attrib["width"]) == float(root.attrib["height"])
    assert len(list(root)) >= 2  # drawn, not empty


def test_requirements_ask_only_for_what_comfyui_may_lack_and_pin_nothing_it_provides() -> None:
    lines = _requirement_lines(REPO / "requirements.txt")
    assert lines == ["safetensors>=0.4.2"]
    for line in lines:
        name = _requirement_name(line)
        assert not name.startswith("torch"), line
        if name in COMFY_PROVIDES:
            assert "==" not in line and "<" not in line and "~=" not in line and "!=" not in line, line


def test_project_dependencies_never_pin_what_comfyui_provides() -> None:
    deps = PYPROJECT["project"].get("dependencies", [])
    for dep in deps:
        name = _requirement_name(dep)
        if name.startswith("torch"):
            assert dep.strip().lower() == name, f"{dep!r}: torch must not carry a version"
        if name in COMFY_PROVIDES:
            assert "==" not in dep and "<" not in dep and "~=" not in dep, dep
    assert {_requirement_name(d) for d in deps} >= {"safetensors"}


def test_readme_opens_with_one_sentence_and_the_quick_start_then_the_two_commands_and_pictures() -> None:
    quick = REPO / "docs" / "quick_start.png"
    assert quick.is_file(), "docs/quick_start.png is missing: tests/browser/test_end_to_end.py writes it"
    with Image.open(quick) as img:
        assert img.format == "PNG" and img.width == 1400 and 500 <= img.height <= 1100, (img.format, img.size)
    shot = REPO / "docs" / "screenshot.png"
    assert shot.is_file(), "docs/screenshot.png is missing: tests/browser/test_end_to_end.py writes it"
    with Image.open(shot) as img:
        assert img.format == "PNG" and 1300 <= img.width <= 1500 and img.height >= 600, (img.format, img.size)
    grid = REPO / "docs" / "demo_grid.png"
    assert grid.is_file(), "docs/demo_grid.png is missing: copy demo_output/grid.png after `make demo`"
    with Image.open(grid) as img:
        # make demo's grid.png: 5 labelled rows × 8 samples (tests/test_demo.py checks the same geometry).
        assert img.format == "PNG" and img.size == (300 + 822, 34 + 516), (img.format, img.size)
    assert "<!-- screenshot -->" not in README
    images = re.findall(r"!\[[^\]]+\]\(([^)]+)\)", README)
    assert images[:3] == ["docs/quick_start.png", "docs/demo_grid.png", "docs/screenshot.png"], images
    # The first screen: the title, one sentence of what the pack does, the two commands that set everything up,
    # then the quick start.
    title, sentence, commands_block, heading = [p for p in README.split("\n\n")[:4]]
    assert title.startswith("# ") and sentence.count(". ") == 0 and sentence.endswith(".") and "\n#" not in sentence
    assert commands_block.startswith("```bash\nmake demo") and "\nmake test" in commands_block
    assert commands_block.count("\n") == 3  # the two commands and nothing else
    assert heading == "## Quick start"
    # Five steps a ComfyUI user follows: install, the simplest template (by the title the browser shows), two
    # LoRAs, Run, the file.
    section = README[README.index("## Quick start"):README.index("\n## ", README.index("## Quick start") + 3)]
    steps = re.findall(r"^(\d)\. \*\*(.+?)\*\*", section, flags=re.MULTILINE)
    assert steps == [("1", "Install."), ("2", "Open the simplest template."), ("3", "Pick two LoRAs."),
                     ("4", "Run."), ("5", "Find the file.")], steps
    assert "**1. Merge two LoRAs in seconds**" in section and "`weights`" in section
    assert "ComfyUI-Manager" in section and "models/loras/duolora/" in section and "python -m duolora" in section
    assert "not been measured" in section  # paper mode's cost on a real SDXL: said, not guessed
    # Order after it: the quick start's picture, the demo's grid, the screenshot, then the rest.
    assert README.index("## Quick start") < README.index("](docs/quick_start.png)") < README.index(
        "](docs/demo_grid.png)") < README.index("](docs/screenshot.png)") < README.index("## Install")
    # Nothing in .gitignore keeps the pictures out of the repository.
    ignored = [p.strip() for p in (REPO / ".gitignore").read_text(encoding="utf-8").splitlines()
               if p.strip() and not p.startswith("#")]
    for pattern in ignored:
        bare = pattern.rstrip("/")
        for part in ("docs", "screenshot.png", "docs/screenshot.png", "demo_grid.png", "docs/demo_grid.png",
                     "quick_start.png", "docs/quick_start.png"):
            assert not fnmatch.fnmatch(part, bare), pattern


def test_readme_install_section_matches_the_metadata() -> None:
    section = README[README.index("## Install"):README.index("\n## ", README.index("## Install") + 3)]
    assert "ComfyUI-Manager" in section
    assert f"`comfy node install {PYPROJECT['project']['name']}`" in section
    clone = re.search(r"git clone (\S+)", section)
    assert clone and clone.group(1) == PYPROJECT["project"]["urls"]["Repository"], section
    assert "pip install -r comfyui-duolora/requirements.txt" in section
    for line in _requirement_lines(REPO / "requirements.txt"):
        assert f"`{line}`" in section, f"the README's install section does not name requirement {line!r}"
