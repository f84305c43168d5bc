#!/usr/bin/env python3
"""Derives the HTML parsing rules that `src/nlp/html/` follows from the parser the reference uses.

Cumulus ETL turns HTML notes into text with inscriptis, which reads them with lxml, that is
libxml2's HTML parser. Positions in a note's text (NLP spans) depend on the tree that parser
builds from sloppy HTML, and on which character references it decodes. This tool asks an
installed lxml rather than restating its rules by hand:

    ~/.cache/reference-cumulus/venv/bin/python tools/derive_html_rules.py src/nlp/html

It writes `autoclose.txt`, the pairs `<open> <new>` where a start tag `<new>` closes an open
element `<open>` that is the current node (libxml2 keeps such a table for HTML 4), found by
parsing `<open>x<new>y` for every pair of the HTML 4 elements; and `entities.tsv`, the HTML5
named character references (name, then the code points of the text it stands for), as
Python's `html.unescape` and libxml2 2.14 decode them. The files are committed; rerun the tool
when the reference's lxml changes (it prints the libxml2 version it asked).
"""

import html.entities
import os
import sys

from lxml import etree
from lxml.html import document_fromstring

# HTML 4's elements as libxml2 knows them, plus `listing`, which its rules name.
ELEMENTS = """a abbr acronym address applet area b base basefont bdo big blockquote body br button
caption center cite code col colgroup dd del dfn dir div dl dt em embed fieldset font form
frame frameset h1 h2 h3 h4 h5 h6 head hr html i iframe img input ins isindex kbd label legend
li link listing map menu meta noembed noframes noscript object ol optgroup option p param
plaintext pre q s samp script select small span strike strong style sub sup table tbody td
textarea tfoot th thead title tr tt u ul var xmp""".split()

# Elements that hold no children (void) or no markup (raw text): nothing to close there.
VOID = set("area base basefont br col frame hr img input isindex link meta param".split())
RAW = set("iframe noembed noframes plaintext script style textarea title xmp".split())


def closes(open_tag: str, new_tag: str) -> bool:
    """Whether `<new_tag>` closes an open `<open_tag>` that is the current node."""
    if open_tag == "head":
        doc = document_fromstring(f"<html><head><{new_tag}>y")
        found = doc.find(f".//{new_tag}")
        return found is not None and found.getparent().tag != "head"
    doc = document_fromstring(f"<body><{open_tag}>x<{new_tag}>y")
    found = doc.find(f".//{open_tag}")
    return not any(child.tag == new_tag for child in found)


def main(out_dir: str) -> None:
    pairs = []
    for open_tag in ELEMENTS:
        if open_tag in VOID or open_tag in RAW or open_tag in ("html", "body", "frameset"):
            continue
        for new_tag in ELEMENTS:
            if new_tag in ("html", "head", "body"):
                continue
            if closes(open_tag, new_tag):
                pairs.append(f"{open_tag} {new_tag}\n")
    with open(os.path.join(out_dir, "autoclose.txt"), "w") as f:
        f.writelines(pairs)

    with open(os.path.join(out_dir, "entities.tsv"), "w") as f:
        for name, text in sorted(html.entities.html5.items()):
            f.write(name + "\t" + " ".join(f"{ord(c):x}" for c in text) + "\n")
    print(f"libxml2 {etree.LIBXML_VERSION}: {len(pairs)} closing pairs", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1])
