"""Convert instruction data to ShareGPT JSONL (the SFT stage also reads alpaca directly; this is for
users who want one format on disk). Inputs: alpaca records, plain question/answer records
(AdvertiseGen's {content, summary} among them, or any two fields named with
--prompt_column/--response_column), or CSV.

    python -m pipeline.convert --input data.json --output data.jsonl [--from auto|alpaca|qa|csv]
        [--prompt_column content --response_column summary]
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from pipeline.command_line import command_parser
from pipeline.data.conversations import (
    COLUMNS,
    InvalidSample,
    column_format,
    field_problem,
    from_alpaca,
    normalize,
    validate,
)
from pipeline.data.files import iter_json_records
from pipeline.errors import UserError, run_cli

QA_KEYS = (
    ("question", "answer"),
    ("query", "response"),
    ("prompt", "response"),
    ("q", "a"),
    COLUMNS,
)


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
            return from_alpaca(
                {"instruction": record[q], "output": record[a], "system": record.get("system")}
            )
    raise InvalidSample(f"expected one of the key pairs {', '.join('/'.join(k) for k in QA_KEYS)}")


def _csv_records(path: Path):
    """Rows as dicts with their line numbers; bytes that are not UTF-8 are an error naming the
    line."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(
            f"--input {path} cannot be read ({e.strerror}); make it readable (chmod a+r)."
        ) from e
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(
            f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); convert the file first, "
            f"e.g. iconv -f GBK -t UTF-8 {path.name} > {path.stem}.utf8.csv"
        ) from e
    # io.StringIO, not str.splitlines: that also breaks at U+2028 and other separators in a cell
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        for row in reader:
            if None in row:  # cells past the header's columns (DictReader files them under None)
                raise UserError(
                    f"{path}:{reader.line_num}: {len(reader.fieldnames) + len(row[None])} cells "
                    f"under a header of {len(reader.fieldnames)} columns; quote a cell that holds "
                    'a comma ("1,000,000") or fix the row.'
                )
            yield reader.line_num, row
    except csv.Error as e:  # e.g. a field over the csv module's 131072 characters
        raise UserError(
            f"{path}:{reader.line_num + 1}: not readable as CSV ({e}); fix the row or write the "
            "data as JSON lines."
        ) from e


def _records(path: Path, kind: str):
    yield from _csv_records(path) if kind == "csv" else iter_json_records(path)


def convert(input_path: str, output_path: str, kind: str, columns: str | None = None) -> int:
    """`columns` ("columns:PROMPT:RESPONSE", column_format) reads every record's question and answer
    from those fields."""
    path = Path(input_path)
    if not path.is_file():
        raise UserError(f"--input {input_path} does not exist.")
    if Path(output_path).resolve() == path.resolve():
        raise UserError(
            f"--output {output_path} is the --input file; write the converted data to another file."
        )
    out = []
    for line, record in _records(path, kind):
        try:
            if columns:
                conv = normalize(record, columns)
            elif kind == "alpaca" or (kind in ("csv", "auto") and "instruction" in record):
                conv = from_alpaca(record)
            else:
                conv = _from_qa(record)
            validate(
                conv
            )  # an empty answer (or question) would become a sample that teaches nothing
        except (InvalidSample, KeyError, TypeError) as e:
            reason = e if isinstance(e, InvalidSample) else field_problem(e)
            raise UserError(f"{path}:{line}: cannot convert this record ({reason}).") from e
        out.append(_sharegpt(conv))
    if not out:
        raise UserError(f"{path} holds no records.")
    Path(output_path).parent.mkdir(parents=True, exist_ok=True)
    with open(output_path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in out)
    return len(out)


def main(argv: list[str] | None = None) -> None:
    parser = command_parser(
        description="Convert alpaca / question-answer / CSV data to ShareGPT JSONL."
    )
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument(
        "--from",
        dest="kind",
        default="auto",
        choices=["auto", "alpaca", "qa", "csv"],
        help="auto (default): alpaca records where they have an instruction, else question/answer.",
    )
    parser.add_argument(
        "--prompt_column", help="The question's field of every record (with --response_column)."
    )
    parser.add_argument("--response_column", help="The answer's field of every record.")
    args = parser.parse_args(argv)
    columns = column_format("columns", args.prompt_column, args.response_column)
    n = convert(args.input, args.output, args.kind, columns if columns != "columns" else None)
    print(f"wrote {n} conversations to {args.output}")


if __name__ == "__main__":
    run_cli(main)
