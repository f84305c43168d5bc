#!/usr/bin/env python3
"""Rewrites the plain-text notes of a DocumentReference NDJSON file as HTML notes, in place, for
side-by-side runs of the NLP tasks on HTML (`HTML=1 benches/llm.sh`). Synthea writes its notes
as markdown-like text; each becomes an HTML document as EHRs export them: `# ` headings as `h2`,
`- ` lines as list items, `Key: value` lines of a section as a two-column table, other lines as
paragraphs with `<br>` between their lines, one section in an indented `div` with a styled
`span`, text escaped with entities (`&amp;`, `&nbsp;` before units), and a comment.

    benches/html_notes.py FILE
"""

import base64
import html
import json
import sys


def to_html(text: str) -> str:
    out = ["<html><head><title>Note</title><style>td { padding: 0 }</style></head><body>"]
    sections = text.split("\n\n")
    for n, section in enumerate(sections):
        lines = [line for line in section.split("\n") if line.strip()]
        if not lines:
            continue
        if lines[0].startswith("# "):
            out.append(f"<h2>{html.escape(lines[0][2:])}</h2>")
            lines = lines[1:]
        items = [line[2:] for line in lines if line.startswith("- ")]
        pairs = [line.split(":", 1) for line in lines if ":" in line and not line.startswith("- ")]
        rest = [line for line in lines if not line.startswith("- ") and ":" not in line]
        if items:
            out.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in items) + "</ul>")
        if pairs:
            rows = "".join(
                f"<tr><td>{html.escape(k)}</td><td align=right>{html.escape(v.strip())}</td></tr>"
                for k, v in pairs
            )
            out.append(f"<table>{rows}</table>")
        if rest:
            body = "<br>\n".join(html.escape(line).replace(" mg", "&nbsp;mg") for line in rest)
            if n % 3 == 2:
                out.append(f'<div style="padding-left: 16px"><span>{body}</span></div>')
            else:
                out.append(f"<p>{body}</p>")
        if n == 1:
            out.append("<!-- generated -->")
    out.append("</body></html>")
    return "\n".join(out)


def main(path: str) -> None:
    notes = [json.loads(line) for line in open(path) if line.strip()]
    for note in notes:
        for content in note.get("content", []):
            attachment = content.get("attachment", {})
            if attachment.get("contentType", "").startswith("text/plain") and "data" in attachment:
                text = base64.b64decode(attachment["data"]).decode("utf-8")
                attachment["data"] = base64.b64encode(to_html(text).encode()).decode()
                attachment["contentType"] = "text/html; charset=utf-8"
    with open(path, "w") as f:
        f.writelines(json.dumps(note) + "\n" for note in notes)


if __name__ == "__main__":
    main(sys.argv[1])
