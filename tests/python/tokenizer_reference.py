"""Python's side of the tokenizer tests and benchmark: what Hugging Face `tokenizers` and
`transformers` make of a tokenizer directory written by `tutela-node tokenizer train`.

    python tokenizer_reference.py DIR CORPUS OUT.json --vocab-size N [--min-frequency F]
        [--text-field text] [--auto-sample K]

- reads CORPUS as the node does: a plain text file line by line, each line with its ending; a
  JSON Lines file (.jsonl, .ndjson) one document (the text field) a line;
- encodes every sequence with DIR/tokenizer.json (`Tokenizer.from_file`, special-token strings
  encoded as text) and writes the ids, for the Rust test to compare with its own;
- trains a byte-level BPE with the same settings in Python and says whether its vocabulary and
  merges equal those of DIR/tokenizer.json;
- loads DIR with `transformers.AutoTokenizer` and checks, on K sequences, that it gives bos and
  the same ids, that decoding gives the text back, and that special-token strings in text are
  not control ids;
- times training and encoding (the benchmark's Python column).

Nothing is downloaded: everything is local files.
"""

import argparse
import json
import time

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers


def read_sequences(path, text_field):
    if path.lower().endswith((".jsonl", ".ndjson")):
        out = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    out.append(json.loads(line)[text_field])
        return out
    # newline="" keeps every line ending as it is, as the node's reader does.
    with open(path, encoding="utf-8", newline="") as f:
        return f.readlines()


def train_in_python(path, sequences, vocab_size, min_frequency, special):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(
        add_prefix_space=False, trim_offsets=True, use_regex=True
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    started = time.perf_counter()
    if path.lower().endswith((".jsonl", ".ndjson")):
        tok.train_from_iterator(sequences, trainer)
    else:
        tok.train([path], trainer)
    return tok, time.perf_counter() - started


def main():
    p = argparse.ArgumentParser()
    p.add_argument("dir")
    p.add_argument("corpus")
    p.add_argument("out")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--min-frequency", type=int, default=2)
    p.add_argument("--text-field", default="text")
    p.add_argument("--auto-sample", type=int, default=200)
    a = p.parse_args()

    sequences = read_sequences(a.corpus, a.text_field)
    ours = Tokenizer.from_file(f"{a.dir}/tokenizer.json")
    ours.encode_special_tokens = True
    started = time.perf_counter()
    encodings = ours.encode_batch(sequences, add_special_tokens=False)
    encode_seconds = time.perf_counter() - started
    ids = [e.ids for e in encodings]
    n_ids = sum(len(i) for i in ids)

    with open(f"{a.dir}/tokenizer.json", encoding="utf-8") as f:
        our_model = json.load(f)["model"]
    special = [t["content"] for t in json.loads(ours.to_str())["added_tokens"]]
    theirs, train_seconds = train_in_python(
        a.corpus, sequences, a.vocab_size, a.min_frequency, special
    )
    their_model = json.loads(theirs.to_str())["model"]

    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(a.dir)
    bos = auto.bos_token_id
    control = {auto.bos_token_id, auto.eos_token_id, auto.pad_token_id}
    sample = sequences[: a.auto_sample]
    auto_ids_equal = all(
        auto(s)["input_ids"] == [bos] + i for s, i in zip(sample, ids)
    )
    auto_round_trip = all(
        auto.decode(auto(s)["input_ids"], skip_special_tokens=True) == s for s in sample
    )
    planted = "note: <|bos|>x<|eos|><|pad|> ends <|eos|>"
    planted_ids = auto(planted)["input_ids"]
    auto_special_as_text = (
        planted_ids[0] == bos
        and not control.intersection(planted_ids[1:])
        and auto.decode(planted_ids, skip_special_tokens=True) == planted
    )

    with open(a.out, "w", encoding="utf-8") as f:
        json.dump(
            {
                "ids": ids,
                "n_sequences": len(sequences),
                "n_ids": n_ids,
                "python_model_equal": our_model == their_model,
                "python_vocab_size": theirs.get_vocab_size(with_added_tokens=True),
                "auto_class": type(auto).__name__,
                "auto_checked": len(sample),
                "auto_ids_equal": auto_ids_equal,
                "auto_round_trip": auto_round_trip,
                "auto_special_as_text": auto_special_as_text,
                "auto_special_ids": {
                    "bos": auto.bos_token_id,
                    "eos": auto.eos_token_id,
                    "pad": auto.pad_token_id,
                },
                "python_train_seconds": train_seconds,
                "python_encode_seconds": encode_seconds,
                "python_ids_per_second": n_ids / encode_seconds if encode_seconds else None,
            },
            f,
        )


if __name__ == "__main__":
    main()
