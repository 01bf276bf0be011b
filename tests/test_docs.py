"""The docs cannot drift: their code runs here, their claims are checked.

Every ```python block of README.md and docs/*.md runs, in order, one namespace
per file (a block may use what an earlier block of its file defined), each
compiled as ``app.py`` (so call sites in shown output read ``app.py:LINE``,
the line within the block). Model specs that would need the local model or an
API key (``"local:..."``, ``"openai:..."``, ``"anthropic:..."``) run on
``"fake:echo"``: the docs show real code, the test checks it runs.

Markers, as HTML comments (invisible when the Markdown is rendered):

- ``<!-- docs-test: skip REASON -->`` before a block: not run, and why.
- ``<!-- docs-test: setup`` ... ``-->``: hidden code run at that point
  (names a fragment needs, such as ``f`` and ``prompts``).

Shown output: a fence with no language (or ``text``) right after a python
block is that block's expected stdout. Whitespace runs match any whitespace,
``...`` matches anything, and a number with a decimal point (a measured time
or ratio) matches any number; everything else must match as written.

```bash blocks are commands: the scripts, flags, test files and make targets
they name must exist. And the repository stands alone: every file it names
exists, nothing points outside it, and every `xcs_jax.` name the docs and the
library's messages mention is importable, none of them private.
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib
import io
import pathlib
import re
import subprocess

import pytest

import xcs_jax

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^```\s*([\w+-]*)\s*$")
_SKIP = re.compile(r"^<!--\s*docs-test:\s*skip\b\s*(.*?)\s*-->\s*$")
_SETUP = re.compile(r"^<!--\s*docs-test:\s*setup\s*$")
_MARKER = re.compile(r"^<!--\s*docs-test:")
_REAL_SPEC = re.compile(r"""(["'])(?:local|openai|anthropic):[^"']*\1""")
_REAL_SPEC_SHOWN = re.compile(r"\b(?:local|openai|anthropic):[\w./-]+")
_NUMBER = r"[-+]?(?:\d+\.\d*|\.\d+)(?:[eE][-+]?\d+)?"
_ANY_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


@dataclasses.dataclass
class Block:
  path: pathlib.Path
  line: int                 # 1-based line of the opening fence (or marker)
  lang: str                 # "python", "bash", "" (text), "setup" (hidden code)
  code: str
  skip: str | None = None   # the reason, for a skipped block
  expected: str | None = None   # shown output, for a python block

  @property
  def where(self) -> str:
    return f"{self.path.relative_to(ROOT)}:{self.line}"


def parse(path: pathlib.Path) -> list[Block]:
  """The fenced blocks and hidden setup of one Markdown file, in order."""
  lines = path.read_text().splitlines()
  blocks: list[Block] = []
  skip = None
  prev_end = -1             # the line that closed the last block
  i = 0
  while i < len(lines):
    line = lines[i]
    if (m := _SKIP.match(line)):
      skip = m.group(1) or ""
      i += 1
      continue
    if _SETUP.match(line):
      end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "-->")
      blocks.append(Block(path, i + 1, "setup", "\n".join(lines[i + 1:end])))
      prev_end = end
      i = end + 1
      continue
    if _MARKER.match(line):
      raise AssertionError(f"{path.relative_to(ROOT)}:{i + 1}: unknown docs-test "
                           f"marker {line!r}: use 'skip REASON' or 'setup'")
    if (m := _FENCE.match(line)):
      end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
      block = Block(path, i + 1, m.group(1), "\n".join(lines[i + 1:end]), skip)
      skip = None
      prev = blocks[-1] if blocks else None
      between = lines[prev_end + 1:i]
      if (block.lang in ("", "text") and prev is not None and prev.lang == "python"
          and prev.expected is None and not any(s.strip() for s in between)):
        prev.expected = block.code
      blocks.append(block)
      prev_end = end
      i = end + 1
      continue
    i += 1
  return blocks


def output_pattern(expected: str) -> re.Pattern:
  parts = []
  for tok in re.split(rf"(\.\.\.|{_NUMBER})", " ".join(expected.split())):
    if tok == "...":
      parts.append(r".*?")
    elif re.fullmatch(_NUMBER, tok):
      parts.append(_ANY_NUMBER)
    else:
      parts.append(re.escape(tok))
  return re.compile("".join(parts), re.S)


def output_matches(expected: str, actual: str) -> bool:
  expected = _REAL_SPEC_SHOWN.sub("fake:echo", expected)
  return output_pattern(expected).fullmatch(" ".join(actual.split())) is not None


def on_fake(code: str) -> str:
  return _REAL_SPEC.sub('"fake:echo"', code)


# --- the collector's own rules ----------------------------------------------


def test_output_rules():
  assert output_matches("{'a': 1, 'wall_s': 0.508}", "{'a': 1, 'wall_s': 0.61234}")
  assert not output_matches("{'a': 1}", "{'a': 2}")
  assert output_matches("x\n  y ...", "x y z w")
  assert output_matches("generate local:smollm2(max_tokens=8)", "generate fake:echo(max_tokens=8)")
  assert not output_matches("a b", "a b c")


def test_parse_markers(tmp_path, monkeypatch):
  monkeypatch.setitem(globals(), "ROOT", tmp_path)
  doc = tmp_path / "d.md"
  doc.write_text("<!-- docs-test: setup\nx = 1\n-->\n\n<!-- docs-test: skip needs a cluster -->\n"
                 "```python\nprint(x)\n```\n\n```python\nprint(x + 1)\n```\n```\n2\n```\n")
  setup, skipped, shown, out = parse(doc)
  assert (setup.lang, setup.code) == ("setup", "x = 1")
  assert skipped.skip == "needs a cluster" and skipped.expected is None
  assert shown.skip is None and shown.expected == "2" and out.lang == ""
  assert on_fake('models.bind("local:smollm2", n=1)') == 'models.bind("fake:echo", n=1)'


# --- every python block runs ------------------------------------------------


def _run(block: Block, namespace: dict) -> str:
  code = compile(on_fake(block.code), "app.py", "exec")
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(code, namespace)  # noqa: S102 - the docs' own examples
  return out.getvalue()


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_code_runs(doc, tmp_path, monkeypatch):
  blocks = parse(doc)
  namespace: dict = {"__name__": "__main__"}
  monkeypatch.chdir(tmp_path)            # files a block writes (a trace) land here
  with xcs_jax.runtime(name=f"docs:{doc.name}"):
    for block in blocks:
      if block.lang not in ("python", "setup"):
        continue
      if block.skip is not None:
        assert block.skip, f"{block.where}: a skipped block says why (skip REASON)"
        continue
      try:
        printed = _run(block, namespace)
      except Exception as e:
        raise AssertionError(f"{block.where}: the block raised {type(e).__name__}: {e}") from e
      if block.expected is not None:
        assert output_matches(block.expected, printed), (
            f"{block.where}: the block printed\n{printed}\nbut the doc shows\n{block.expected}")


# --- commands name what exists ----------------------------------------------


def _make_targets() -> set[str]:
  return set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_commands_name_what_exists(doc):
  targets = _make_targets()
  for block in parse(doc):
    if block.lang not in ("bash", "sh", "shell") or block.skip is not None:
      continue
    for raw in block.code.splitlines():
      line = raw.split(" #", 1)[0].strip()
      words = line.split()
      if words[:1] == ["make"]:
        for target in words[1:]:
          assert target in targets, f"{block.where}: no make target {target!r}"
      scripts = [w for w in words if w.endswith(".py") and "/" in w]
      for path in scripts:
        assert (ROOT / path).is_file(), f"{block.where}: {path} does not exist"
      if len(scripts) == 1 and "pytest" not in words:
        source = (ROOT / scripts[0]).read_text()
        for flag in (w.split("=")[0] for w in words if w.startswith("--")):
          assert f'"{flag}"' in source, f"{block.where}: {scripts[0]} has no {flag} option"


# --- the repository stands alone --------------------------------------------


def _tracked_text_files() -> list[pathlib.Path]:
  try:
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
  except (OSError, subprocess.CalledProcessError):
    pytest.skip("not a git checkout")
  keep = (".py", ".md", ".toml", ".cfg", ".txt", ".yml", ".yaml", ".sh", "Makefile", ".json")
  return [ROOT / n for n in names if n.endswith(keep) and (ROOT / n).is_file()]


_OUTSIDE = [re.compile(p) for p in (r"\.\./shared", r"FACTS\.md", r"STYLE\.md", r"/work/")]
_REPO_PATH = re.compile(r"(?<![\w./-])((?:docs|examples|benchmarks|tests|xcs_jax)/[\w./-]*\w\.(?:py|md|json|csv|jsonl))\b")
_LINK = re.compile(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)")


def _anchors(md: pathlib.Path) -> set[str]:
  """The heading anchors GitHub makes for a Markdown file."""
  found = set()
  for line in md.read_text().splitlines():
    if line.startswith("#"):
      title = line.lstrip("#").strip().lower()
      found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
  return found


def test_repository_points_only_inside_itself():
  this = pathlib.Path(__file__).resolve()
  problems = []
  for path in _tracked_text_files():
    if path == this:
      continue
    text = path.read_text(errors="replace")
    rel = path.relative_to(ROOT)
    for pat in _OUTSIDE:
      for m in pat.finditer(text):
        problems.append(f"{rel}: points outside the repository ({m.group(0)!r})")
    for m in _REPO_PATH.finditer(text):
      if not (ROOT / m.group(1)).exists():
        problems.append(f"{rel}: names {m.group(1)}, which the repository does not contain")
    if path.suffix == ".md":
      for m in _LINK.finditer(text):
        target, anchor = m.group(1), m.group(2)
        if "://" in target or target.startswith("mailto:"):
          continue
        linked = path.parent / target if target else path
        if not linked.exists():
          problems.append(f"{rel}: links to {target}, which does not exist")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
          problems.append(f"{rel}: links to {target}#{anchor}, a heading it does not have")
  assert not problems, "\n".join(problems)


# --- the names users are told about are public ------------------------------

_NAME = re.compile(r"\bxcs_jax(?:\.[A-Za-z_]\w*)+")


def _resolves(dotted: str) -> bool:
  parts = dotted.split(".")
  for cut in range(len(parts), 0, -1):
    try:
      obj = importlib.import_module(".".join(parts[:cut]))
    except ImportError:
      continue
    for attr in parts[cut:]:
      if not hasattr(obj, attr):
        return False
      obj = getattr(obj, attr)
    return True
  return False


def _strings_of(path: pathlib.Path):
  """The string constants of a module (messages, docstrings), with lines."""
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
      yield node.lineno, node.value


def _mentions():
  for doc in DOCS:
    for n, line in enumerate(doc.read_text().splitlines(), 1):
      # A migration table's row, `| old | new |`: only the new names are checked.
      if line.startswith("|") and line.count("xcs_jax.") >= 2:
        line = line.rstrip().rstrip("|").rsplit("|", 1)[-1]
      for m in _NAME.finditer(line):
        yield f"{doc.relative_to(ROOT)}:{n}", m.group(0)
  for module in sorted((ROOT / "xcs_jax").rglob("*.py")):
    for n, value in _strings_of(module):
      for m in _NAME.finditer(value):
        yield f"{module.relative_to(ROOT)}:{n}", m.group(0)


def test_names_mentioned_are_public_and_exist():
  problems = []
  for where, name in _mentions():
    name = name.rstrip(".")
    if "._" in name:
      problems.append(f"{where}: mentions the private {name}")
    elif "._" not in name and not _resolves(name):
      problems.append(f"{where}: mentions {name}, which does not exist")
  assert not problems, "\n".join(sorted(set(problems)))
