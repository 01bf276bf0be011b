"""Learn a text classifier on a small model's numbers (docs/optimization.md).

    python -m xcs_jax.recipes.classify --train T.tsv --eval E.tsv --model local:smollm2 \
        --label-names 0=negative,1=positive

From code:

    from xcs_jax.recipes import classify
    result = classify.fit(texts, labels, label_names={"0": "negative", "1": "positive"})
    result.program.predict(new_texts)
    result.program.save("my_program"); classify.load("my_program")
"""
from xcs_jax._src.recipes.classify import DEFAULT_MODEL
from xcs_jax._src.recipes.classify import build_parser
from xcs_jax._src.recipes.classify import fit
from xcs_jax._src.recipes.classify import main
from xcs_jax._src.recipes.classify import run
from xcs_jax._src.recipes.features import Source
from xcs_jax._src.recipes.learn import FitResult
from xcs_jax._src.recipes.learn import Trial
from xcs_jax._src.recipes.learn import default_sources
from xcs_jax._src.recipes.program import Program
from xcs_jax._src.recipes.program import load
from xcs_jax._src.recipes.prompts import DEFAULT_INSTRUCTIONS
from xcs_jax._src.recipes.table import LabelSet
from xcs_jax._src.recipes.table import Table
from xcs_jax._src.recipes.table import TableError
from xcs_jax._src.recipes.table import read_table

__all__ = [
    "DEFAULT_INSTRUCTIONS",
    "DEFAULT_MODEL",
    "FitResult",
    "LabelSet",
    "Program",
    "Source",
    "Table",
    "TableError",
    "Trial",
    "build_parser",
    "default_sources",
    "fit",
    "load",
    "main",
    "read_table",
    "run",
]

if __name__ == "__main__":
  main()
