"""Prints what a stock PDF reader (pypdf) finds in a report: its page count, its text and its
attachments, as JSON. Used by audit/tests/integration/report.rs."""

import json
import sys

from pypdf import PdfReader


def main() -> None:
    reader = PdfReader(sys.argv[1], strict=True)
    text = "\n".join(page.extract_text() or "" for page in reader.pages)
    attachments = {
        name: [len(data) for data in datas] for name, datas in reader.attachments.items()
    }
    manifest = reader.attachments.get("tutela-report-manifest.json", [b"{}"])[0]
    json.dump(
        {
            "pages": len(reader.pages),
            "text": text,
            "attachments": attachments,
            "manifest_digest": json.loads(manifest).get("content_digest"),
            "title": (reader.metadata or {}).get("/Title"),
        },
        sys.stdout,
    )


if __name__ == "__main__":
    main()
