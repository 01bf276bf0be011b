"""The classify recipe (xcs_jax.recipes.classify) on the `fake` provider.

The fake's embedding sums a random vector per word, so texts built from
class-specific words are separable by a linear head over embeddings; its
option scores favour an option whose words occur in the text. Every CLI
option, K > 2 classes, and bad input are covered; the real model runs in
benchmarks/bench_classify.py and, briefly, in the `local_model` test below.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import xcs_jax
from xcs_jax.recipes import classify
from xcs_jax._src.recipes import baseline as baseline_lib
from xcs_jax._src.recipes import budget as budget_lib
from xcs_jax._src.recipes import features as features_lib
from xcs_jax._src.recipes import head as head_lib
from xcs_jax._src.recipes import prompts
from xcs_jax._src.recipes import table as table_lib

WORDS = {"neg": ["awful", "boring", "dull", "dreadful"],
         "pos": ["great", "lovely", "superb", "charming"],
         "neu": ["okay", "average", "plain", "middling"]}
CODES = {"neg": "0", "pos": "1", "neu": "2"}
KEYS = ("eval_accuracy", "train_accuracy", "calls", "cache_hits", "seconds")


def make_rows(n: int, classes=("neg", "pos", "neu"), offset: int = 0):
  rng = np.random.default_rng(offset)
  rows = []
  for i in range(n):
    c = classes[i % len(classes)]
    a, b = rng.choice(WORDS[c], 2, replace=False)
    rows.append((f"item {offset + i}: the film was {a} and {b}", c))
  return rows


def write(path, rows, header=("text", "label"), sep="\t"):
  with open(path, "w", encoding="utf-8") as f:
    f.write(sep.join(header) + "\n")
    for row in rows:
      f.write(sep.join(row) + "\n")
  return str(path)


@pytest.fixture(autouse=True)
def fresh_runtime():
  """Each test counts its own calls: a runtime of its own, without the response
  cache (the cache test below makes one with it)."""
  with xcs_jax.runtime(cache=False):
    yield


@pytest.fixture
def files(tmp_path):
  return (write(tmp_path / "train.tsv", make_rows(30)),
          write(tmp_path / "eval.tsv", make_rows(15, offset=100)))


def cli(capsys, *argv):
  """Runs the command line; returns (summary from the last line, all stdout)."""
  classify.main(["--model", "fake:echo", "--no-progress", *argv])
  out = capsys.readouterr().out
  last = out.strip().splitlines()[-1]
  return json.loads(last), out


def test_cli_learns_k3_classes_and_ends_with_a_json_line(files, capsys):
  train, eval_ = files
  summary, out = cli(capsys, "--train", train, "--eval", eval_)
  assert all(k in summary for k in KEYS)
  assert summary["classes"] == ["neg", "neu", "pos"]
  assert summary["eval_accuracy"] >= 0.8     # word-built classes: the embedding separates them
  assert summary["cache_hits"] == 0
  # 8 calls per text (the label contrast embeds 3 times) x (30 + 15) texts,
  # plus the baseline: 3 instructions x 30 + 15.
  assert summary["calls_per_text"] == 8
  assert summary["calls"] == 8 * 45 + 3 * 30 + 15
  assert summary["baseline"]["calls"] == 3 * 30 + 15
  assert "zero-shot" in out and "calibrated" in out and "baseline" in out
  assert sum(line.startswith("*") for line in out.splitlines()) == 2  # chosen row + footnote


def test_calls_are_counted_per_item_from_usage(files, capsys):
  before = sum(u["calls"] for u in xcs_jax.usage().values())
  summary, _ = cli(capsys, "--train", files[0], "--eval", files[1], "--no-baseline")
  after = sum(u["calls"] for u in xcs_jax.usage().values())
  assert summary["calls"] == after - before == 8 * 45
  assert summary["baseline"] is None


def test_cache_hits_are_reported_and_not_counted_as_calls(files, tmp_path, capsys):
  with xcs_jax.runtime(cache=True, cache_dir=str(tmp_path / "cache")):
    first, _ = cli(capsys, "--train", files[0], "--eval", files[1], "--no-baseline")
    again, _ = cli(capsys, "--train", files[0], "--eval", files[1], "--no-baseline")
  assert (first["calls"], first["cache_hits"]) == (8 * 45, 0)
  assert (again["calls"], again["cache_hits"]) == (0, 8 * 45)
  assert again["eval_accuracy"] == first["eval_accuracy"]


def test_budget_caps_every_call_of_the_run(files, capsys):
  summary, out = cli(capsys, "--train", files[0], "--eval", files[1], "--budget", "400")
  assert summary["calls"] <= 400
  assert summary["budget"] == 400
  # half each: the program fits sources [1] (3 calls per text) and [2] (1) over
  # 45 texts; the baseline gets as many calls.
  assert summary["program_calls"] == 4 * 45
  assert summary["baseline"]["calls"] <= summary["program_calls"]
  assert "[2]" in out and "[3]" not in out.split("program")[0]


def test_a_tight_budget_learns_from_fewer_training_texts(files, capsys):
  summary, _ = cli(capsys, "--train", files[0], "--eval", files[1], "--budget", "81",
                   "--no-baseline")
  assert summary["calls"] <= 81
  assert summary["train_texts"] == 12   # the first source, 3 calls per text: 81 / 3 - 15


def test_a_budget_below_the_eval_file_is_a_clear_error(files, capsys):
  with pytest.raises(SystemExit) as e:
    cli(capsys, "--train", files[0], "--eval", files[1], "--budget", "10")
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert "`--budget 10` is too small" in err and "Raise `--budget`" in err


def test_label_names_are_what_the_model_reads(tmp_path, capsys):
  coded = lambda rows: [(t, CODES[c]) for t, c in rows]
  train = write(tmp_path / "t.tsv", coded(make_rows(30)))
  eval_ = write(tmp_path / "e.tsv", coded(make_rows(15, offset=7)))
  summary, out = cli(capsys, "--train", train, "--eval", eval_, "--no-baseline",
                     "--label-names", "0=negative,1=positive,2=neutral")
  assert summary["classes"] == ["0", "1", "2"]
  assert "negative, positive or neutral" in out
  assert "'Negative'" in out  # capitalized variants are options too


def test_text_and_label_columns_by_name(tmp_path, capsys):
  rows = [(str(i), c, t) for i, (t, c) in enumerate(make_rows(30))]
  header = ("id", "gold", "sentence")
  train = write(tmp_path / "t.csv", [(a, b, c.replace(",", " ")) for a, b, c in rows],
                header=header, sep=",")
  eval_ = write(tmp_path / "e.csv", [(a, b, c) for a, b, c in rows[:12]], header=header,
                sep=",")
  summary, _ = cli(capsys, "--train", train, "--eval", eval_, "--text-column", "sentence",
                   "--label-column", "gold", "--no-baseline")
  assert summary["classes"] == ["neg", "neu", "pos"]
  assert summary["eval_texts"] == 12


def test_save_and_load_give_the_same_predictions(files, tmp_path, capsys):
  folder = str(tmp_path / "program")
  learned, _ = cli(capsys, "--train", files[0], "--eval", files[1], "--save", folder,
                   "--no-baseline")
  assert sorted(os.listdir(folder)) == ["head.npz", "program.json"]
  loaded, out = cli(capsys, "--load", folder, "--eval", files[1])
  assert loaded["eval_accuracy"] == learned["eval_accuracy"]
  assert loaded["calls"] == loaded["calls_per_text"] * 15
  assert loaded["program"] == learned["program"]
  assert "loaded program" in out


def test_library_fit_predict_save_load(tmp_path):
  rows = make_rows(30)
  result = classify.fit([t for t, _ in rows], [c for _, c in rows], model="fake:echo",
                        progress=False)
  assert any(t.chosen for t in result.trials)
  new = [t for t, _ in make_rows(9, offset=50)]
  predicted = result.program.predict(new, progress=False)
  assert set(predicted) <= {"neg", "pos", "neu"}
  result.program.save(tmp_path / "p")
  again = classify.load(tmp_path / "p")
  assert again.predict(new, progress=False) == predicted


def test_custom_instructions_seed_and_batch_size(files, capsys):
  instruction = "Pick one of {labels} for this review."
  a, out = cli(capsys, "--train", files[0], "--eval", files[1], "--instruction", instruction,
               "--seed", "3", "--batch-size", "7", "--no-baseline")
  assert "Pick one of neg, neu or pos for this review.\\nText: {text}" in out
  assert a["seed"] == 3 and a["calls"] == 6 * 45   # 1 instruction + contrast (3) + 2 embeddings
  b, _ = cli(capsys, "--train", files[0], "--eval", files[1], "--instruction", instruction,
             "--seed", "3", "--no-baseline")
  for key in ("eval_accuracy", "train_accuracy", "cv_accuracy", "program"):
    assert a[key] == b[key]   # batch size changes no value; same seed, same result


def test_progress_bars_go_to_stderr_and_can_be_turned_off(files, capsys):
  classify.main(["--model", "fake:echo", "--train", files[0], "--eval", files[1],
                 "--no-baseline"])
  captured = capsys.readouterr()
  assert "train: source 1/6" in captured.err
  json.loads(captured.out.strip().splitlines()[-1])
  cli(capsys, "--train", files[0], "--eval", files[1], "--no-baseline")
  assert "source 1/6" not in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    ("", "is empty"),
    ("text\tlabel\n", "has a header but no rows"),
    ("text\n" + "a\n", "has one column"),
    ("text\tlabel\nsome text\tpos\nmore text\tpos\n", "only one class"),
    ("text\tlabel\nsome text\tpos\nmore\ttext\tneg\n", "line 3: 3 fields"),
    ("text\tlabel\n \tpos\nmore text\tneg\n", "line 2: the text ('text') is empty"),
    ("text\tlabel\nsome text\t\nmore text\tneg\n", "line 2: the label ('label') is empty"),
])
def test_bad_training_files_are_clear_errors(tmp_path, capsys, content, message):
  path = tmp_path / "bad.tsv"
  path.write_text(content)
  with pytest.raises(SystemExit) as e:
    cli(capsys, "--train", str(path))
  assert e.value.code == 2
  assert message in capsys.readouterr().err


def test_missing_columns_name_the_columns_there_are(files, capsys):
  with pytest.raises(SystemExit):
    cli(capsys, "--train", files[0], "--text-column", "review")
  err = capsys.readouterr().err
  assert "`--text-column`" in err and "no column 'review'" in err and "'text', 'label'" in err
  with pytest.raises(SystemExit):
    cli(capsys, "--train", files[0], "--label-column", "gold")
  assert "`--label-column`" in capsys.readouterr().err


def test_unknown_labels_at_eval_time_are_a_clear_error_before_any_call(tmp_path, capsys):
  train = write(tmp_path / "t.tsv", make_rows(20, classes=("neg", "pos")))
  eval_ = write(tmp_path / "e.tsv", make_rows(9))  # has "neu" too
  before = sum(u["calls"] for u in xcs_jax.usage().values())
  with pytest.raises(SystemExit):
    cli(capsys, "--train", train, "--eval", eval_)
  err = capsys.readouterr().err
  assert "label(s) 'neu'" in err and "the training data lacks" in err
  assert sum(u["calls"] for u in xcs_jax.usage().values()) == before


def test_missing_files_and_option_conflicts(files, tmp_path, capsys):
  cases = [
      (["--train", str(tmp_path / "nope.tsv")], "is not a file"),
      ([], "give `--train FILE`"),
      (["--train", files[0], "--load", str(tmp_path)], "not both"),
      (["--load", str(tmp_path), "--eval", files[1]], "no program.json"),
      (["--train", files[0], "--label-names", "0negative"], "label=word"),
      (["--train", files[0], "--label-names", "zzz=other"], "names label(s) 'zzz'"),
      (["--train", files[0], "--label-names", "neg=bad,pos=bad"], "the same word"),
      (["--train", files[0], "--budget", "0"], "positive number of model calls"),
      (["--train", files[0], "--instruction", "Say {mood}"], "not a valid template"),
  ]
  for argv, message in cases:
    with pytest.raises(SystemExit):
      cli(capsys, *argv)
    assert message in capsys.readouterr().err, argv


def test_load_needs_eval_and_rejects_another_model(files, tmp_path, capsys):
  folder = str(tmp_path / "p")
  cli(capsys, "--train", files[0], "--save", folder, "--no-baseline")
  with pytest.raises(SystemExit):
    cli(capsys, "--load", folder)
  assert "`--load` needs `--eval FILE`" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    classify.main(["--load", folder, "--eval", files[1], "--model", "fake:upper"])
  assert "reads features of 'fake:echo'" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    cli(capsys, "--load", folder, "--eval", files[1], "--budget", "5")
  assert "Raise `--budget` to at least" in capsys.readouterr().err


# -- the parts -----------------------------------------------------------------


def test_plan_drops_sources_first_then_training_texts():
  kw = dict(num_train=100, num_eval=50, source_calls=[2, 1, 1, 1], num_instructions=3,
            num_classes=2)
  assert budget_lib.plan(None, baseline=True, **kw) == (4, 5, 100, 3, 100)
  p = budget_lib.plan(1000, baseline=True, **kw)
  assert (p.num_sources, p.calls_per_text) == (2, 3) and p.calls(50) <= 1000
  assert p.baseline_calls(50) <= p.program_calls(50)
  p = budget_lib.plan(200, baseline=False, **kw)
  assert p == (1, 2, 50, 0, 0)
  with pytest.raises(ValueError, match="at least 216"):
    budget_lib.plan(200, baseline=True, **kw)


def test_stratified_order_keeps_every_prefix_balanced():
  y = np.array([0] * 10 + [1] * 10 + [2] * 5)
  order = budget_lib.stratified_order(y, seed=0)
  assert sorted(order) == list(range(25))
  assert np.bincount(y[order[:9]]).tolist() == [3, 3, 3]


def test_cross_validation_prefers_stronger_l2_on_noise_and_weaker_on_signal():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((120, 40)).astype(np.float32)
  noise_y = rng.integers(0, 2, 120)
  signal_y = (x[:, 0] + 0.1 * rng.standard_normal(120) > 0).astype(np.int32)
  noise = head_lib.cross_validate(x, noise_y, 2)
  signal = head_lib.cross_validate(x, signal_y, 2)
  assert noise.best_l2 > signal.best_l2
  assert signal.accuracy[signal.best_index] > 0.85
  head = head_lib.fit_head(x, signal_y, 2, l2=signal.best_l2)
  assert np.mean(head.logits(x).argmax(-1) == signal_y) > 0.9


def test_calibration_head_moves_a_label_bias():
  rng = np.random.default_rng(1)
  y = rng.integers(0, 3, 90)
  scores = rng.standard_normal((90, 3)) + 2.0 * np.eye(3)[y] + np.array([3.0, 0.0, 0.0])
  assert np.mean(scores.argmax(-1) == y) < 0.6
  head = head_lib.fit_head(scores, y, 3, kind="calibration")
  assert np.mean(head.logits(scores).argmax(-1) == y) > 0.8
  assert head.b[0] < head.b[1] and head.b[0] < head.b[2]


def test_prompts_and_options_come_from_label_words():
  assert prompts.label_phrase(["a", "b", "c"]) == "a, b or c"
  template = prompts.prompt_template(prompts.DEFAULT_INSTRUCTIONS[0], ["negative", "positive"])
  assert template.endswith("\nText: {text}") and "negative or positive" in template
  assert prompts.prompt_template("Is it {labels}? {text} Answer:", ["x", "y"]) == \
      "Is it x or y? {text} Answer:"
  assert prompts.answer_options(["negative", "Positive"]) == ("negative", "Positive", "Negative")


def test_parse_label_reads_one_label_word():
  names = ["negative", "positive", "very positive"]
  assert baseline_lib.parse_label("Positive.", names) == 1
  assert baseline_lib.parse_label("It is very positive!", names) == 2
  assert baseline_lib.parse_label("positive or negative", names) == -1
  assert baseline_lib.parse_label("nonnegative", names) == -1


def test_label_set_sorts_numbers_numerically():
  labels = table_lib.label_set(["10", "2", "1", "2"], {}, "f")
  assert labels.labels == ("1", "2", "10")


@pytest.mark.local_model
def test_recipe_on_the_local_model(tmp_path, capsys):
  """A few real sentences, a small budget: the recipe runs end to end."""
  pos = ["a warm, funny and beautifully acted film", "one of the best movies of the year",
         "a delightful and moving story", "smart, sharp and wonderfully entertaining"]
  neg = ["a dull, lifeless and tedious mess", "the worst film i have seen in years",
         "boring, clumsy and far too long", "a pointless and ugly waste of time"]
  rows = [(t, "1") for t in pos] + [(t, "0") for t in neg]
  train = write(tmp_path / "t.tsv", rows[::2] + rows[1::2][:2])
  eval_ = write(tmp_path / "e.tsv", rows[1::2][2:])
  classify.main(["--train", train, "--eval", eval_, "--label-names", "0=negative,1=positive",
                 "--budget", "24", "--no-progress"])
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["calls"] <= 24 and summary["eval_accuracy"] is not None


def test_candidate_instructions_take_turns_naming_each_label_first():
  sources = classify.default_sources(["a", "b", "c"])
  scores = [s.template for s in sources if s.kind == "score"]
  assert [t.split("\n")[0].count("a, b or c") > 0 for t in scores] == [True, False, False]
  assert "b, c or a" in scores[1] and "c, a or b" in scores[2]
  assert [s.kind for s in sources] == ["contrast", "score", "embed", "score", "score",
                                       "embed"]
  assert sources[0].calls_per_text == 3
  assert all(s.options == ("a", "b", "c", "A", "B", "C") for s in sources if s.kind == "score")


def test_contrast_features_keep_only_what_differs_between_labels():
  rng = np.random.default_rng(0)
  shared = rng.standard_normal((5, 1, 8))          # the text's own tokens: the same for every label
  per_label = rng.standard_normal((1, 3, 8))       # what reading each label adds
  raw = shared + per_label
  out = features_lib.contrast_features(raw)
  assert out.shape == (5, 2 * 8)
  np.testing.assert_allclose(out, np.broadcast_to(out[:1], out.shape), atol=1e-6)
  centred = per_label[0] - per_label[0].mean(0)
  np.testing.assert_allclose(out[0], (centred / np.linalg.norm(centred))[:2].ravel(), atol=1e-6)


def test_mean_of_heads_is_the_mean_of_the_logits():
  rng = np.random.default_rng(0)
  heads = [head_lib.LinearHead(head_lib.Standardizer(rng.standard_normal(d).astype(np.float32),
                                                     np.ones(d, np.float32)),
                               rng.standard_normal((d, 3)).astype(np.float32),
                               rng.standard_normal(3).astype(np.float32)) for d in (2, 5)]
  x = [rng.standard_normal((4, 2)), rng.standard_normal((4, 5))]
  joint = head_lib.mean_of_heads(heads)
  np.testing.assert_allclose(joint.logits(np.concatenate(x, 1)),
                             (heads[0].logits(x[0]) + heads[1].logits(x[1])) / 2, atol=1e-5)


def test_load_refuses_label_names_and_bad_batch_sizes(files, tmp_path, capsys):
  folder = str(tmp_path / "p")
  cli(capsys, "--train", files[0], "--save", folder, "--no-baseline")
  with pytest.raises(SystemExit):
    cli(capsys, "--load", folder, "--eval", files[1], "--label-names", "neg=bad")
  assert "drop `--label-names` when loading" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    cli(capsys, "--train", files[0], "--batch-size", "0")
  assert "`--batch-size` must be a positive" in capsys.readouterr().err
