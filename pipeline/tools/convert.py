"""Convert instruction data to ShareGPT JSONL (the SFT stage also reads alpaca directly; this is for
users who want one format on disk). Inputs: alpaca records, plain question/answer records, or CSV.

    python -m pipeline.convert --input data.json --output data.jsonl [--from alpaca|qa|csv]
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from pipeline.data.conversations import InvalidSample, from_alpaca
from pipeline.data.files import iter_json_records
from pipeline.errors import UserError, run_cli

QA_KEYS = (("question", "answer"), ("query", "response"), ("prompt", "response"), ("q", "a"))


def _sharegpt(conv: dict) -> dict:
    out, names = {"conversations": []}, {"user": "human", "assistant": "gpt"}
    for m in conv["messages"]:
        if m["role"] == "system":
            out["system"] = m["content"]
        else:
            out["conversations"].append({"from": names[m["role"]], "value": m["content"]})
    return out


def _from_qa(record: dict) -> dict:
    for q, a in QA_KEYS:
        if isinstance(record.get(q), str) and isinstance(record.get(a), str):
            return from_alpaca({"instruction": record[q], "output": record[a], "system": record.get("system")})
    raise InvalidSample(f"expected one of the key pairs {', '.join('/'.join(k) for k in QA_KEYS)}")


def _records(path: Path, kind: str):
    if kind == "csv":
        with path.open(encoding="utf-8", newline="") as f:
            yield from enumerate(csv.DictReader(f), start=2)
    else:
        yield from iter_json_records(path)


def convert(input_path: str, output_path: str, kind: str) -> int:
    path = Path(input_path)
    if not path.is_file():
        raise UserError(f"--input {input_path} does not exist.")
    out = []
    for line, record in _records(path, kind):
        try:
            if kind == "alpaca" or (kind == "csv" and "instruction" in record):
                conv = from_alpaca(record)
            else:
                conv = _from_qa(record)
        except (InvalidSample, KeyError, TypeError) as e:
            raise UserError(f"{path}:{line}: cannot convert this record ({e}).") from e
        out.append(_sharegpt(conv))
    if not out:
        raise UserError(f"{path} holds no records.")
    Path(output_path).parent.mkdir(parents=True, exist_ok=True)
    with open(output_path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in out)
    return len(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Convert alpaca / question-answer / CSV data to ShareGPT JSONL.")
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--from", dest="kind", default="alpaca", choices=["alpaca", "qa", "csv"])
    args = parser.parse_args(argv)
    n = convert(args.input, args.output, args.kind)
    print(f"wrote {n} conversations to {args.output}")


if __name__ == "__main__":
    run_cli(main)
