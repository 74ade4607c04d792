"""Write tests/config/ludwig_corpus/ludwig_llm_keys.txt: every key of Ludwig's LLM config schema, by section.

Reads Ludwig's schema source from a git checkout or mirror (no Ludwig install): each config class's annotated
fields, with those of its base classes, parsed with `ast`. Usage:
    python scripts/ludwig_llm_keys.py GIT_DIR > tests/config/ludwig_corpus/ludwig_llm_keys.txt
"""

from __future__ import annotations

import ast
import subprocess
import sys

SECTIONS: dict[str, list[str]] = {
    "": ["LLMModelConfig"],
    "input_features[]": ["LLMTextInputFeatureConfig"],
    "output_features[]": ["LLMTextOutputFeatureConfig", "LLMCategoryOutputFeatureConfig"],
    "output_features[].decoder": ["TextExtractorDecoderConfig", "CategoryExtractorDecoderConfig"],
    "preprocessing": ["PreprocessingConfig"],
    "preprocessing.split": [
        *("RandomSplitConfig", "FixedSplitConfig", "StratifySplitConfig", "DateTimeSplitConfig", "HashSplitConfig")
    ],
    "prompt": ["PromptConfig"],
    "generation": ["LLMGenerationConfig"],
    "quantization": ["QuantizationConfig"],
    "adapters": ["NamedAdaptersConfig"],
    "adapters.merge": ["MergeAdaptersConfig"],
    "trainer.learning_rate_scheduler": ["LRSchedulerConfig"],
    "trainer.gradient_clipping": ["GradientClippingConfig"],
}
"""Section -> Ludwig's config classes for it."""
REGISTRIES = {"register_adapter": "adapter", "register_llm_trainer_schema": "trainer"}
REGISTRIES |= {"register_optimizer": "trainer.optimizer"}
"""Decorators that register a class under a `type`: section[type] lists that class's keys."""


def git(root: str, *args: str) -> str:
    return subprocess.run(["git", "-C", root, *args], check=True, capture_output=True, text=True).stdout


def main(root: str) -> None:
    paths = [p for p in git(root, "ls-tree", "-r", "--name-only", "HEAD", "ludwig/schema").split() if p.endswith(".py")]
    classes: dict[str, tuple[list[str], list[str]]] = {}
    registered: list[tuple[str, str, str]] = []
    for path in paths:
        for node in ast.walk(ast.parse(git(root, "show", f"HEAD:{path}"))):
            if not isinstance(node, ast.ClassDef):
                continue
            fields = [
                s.target.id
                for s in node.body
                if isinstance(s, ast.AnnAssign)
                and isinstance(s.target, ast.Name)
                and not s.target.id.startswith("_")
                and "ClassVar" not in ast.unparse(s.annotation)
            ]
            classes.setdefault(node.name, ([ast.unparse(b).split(".")[-1] for b in node.bases], fields))
            for deco in node.decorator_list:
                if isinstance(deco, ast.Call) and ast.unparse(deco.func) in REGISTRIES:
                    args = [*deco.args, *(k.value for k in deco.keywords if k.arg == "name")]
                    if args and isinstance(args[0], ast.Constant):
                        registered.append((REGISTRIES[ast.unparse(deco.func)], str(args[0].value), node.name))

    def keys(name: str) -> list[str]:
        bases, fields = classes.get(name, ([], []))
        return [k for base in bases for k in keys(base)] + fields

    commit = git(root, "rev-parse", "HEAD").strip()
    print(f"# Keys of Ludwig's LLM config schema, from ludwig-ai/ludwig@{commit} ludwig/schema/**/*.py")
    print("# (annotated fields of each config class and its bases, read with ast by scripts/ludwig_llm_keys.py).")
    print("# One line per key: SECTION KEY; SECTION[TYPE] is the class registered under that type.")
    lines = set()
    for section, names in SECTIONS.items():
        lines |= {f"{section or '.'} {k}" for name in names for k in keys(name)}
    lines |= {f"{section}[{kind}] {k}" for section, kind, name in registered for k in keys(name)}
    print("\n".join(sorted(lines)))


if __name__ == "__main__":
    main(sys.argv[1])
