#!/usr/bin/env python3
"""Builds `src/input/icd10cm.tsv.gz`: every ICD-10-CM code with its description, for the
display names of i2b2 diagnoses (docs/i2b2.md).

Source: the ICD-10-CM tabular list (April 1, 2026 release) that CDC's National Center for
Health Statistics publishes; ICD-10-CM is a US government work in the public domain. It is
taken from the `simple-icd-10-cm` package (MIT), which ships the published XML unchanged;
only the XML is read, none of the package's code.

Blocks of categories are listed under their range ("D55-D59": "Hemolytic anemias
(D55-D59)"), as the tabular list names them. Codes with a seventh character get the
description of their parent and the character's meaning, joined by a comma, as the tabular
list defines them ("R40.2412": "Glasgow coma scale score 13-15, at arrival to emergency
department"); codes shorter than six characters are padded with the placeholder X first, as
the tabular list says.

Usage: tools/gen_icd10cm.py [WHEEL]   (downloads the wheel with pip when not given)
"""

import gzip
import io
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile

PACKAGE = "simple-icd-10-cm==1.5.0"
XML = "simple_icd_10_cm/data/icd10c-tabular-April-1-2026.xml"
OUT = os.path.join(os.path.dirname(__file__), "..", "src", "input", "icd10cm.tsv.gz")


def wheel_path(argv):
    if len(argv) > 1:
        return argv[1]
    folder = tempfile.mkdtemp()
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", folder, PACKAGE],
        check=True,
    )
    return os.path.join(folder, os.listdir(folder)[0])


def seventh_characters(diag):
    """The diag's own seventh-character definitions: {character: meaning}."""
    defs = diag.find("sevenChrDef")
    if defs is None:
        return None
    return {e.get("char"): " ".join(e.text.split()) for e in defs.findall("extension")}


def walk(diag, inherited, out):
    name = diag.findtext("name").strip()
    desc = " ".join(diag.findtext("desc").split())
    out[name] = desc
    sevens = seventh_characters(diag) or inherited
    children = diag.findall("diag")
    for child in children:
        walk(child, sevens, out)
    if not children and sevens:
        bare = name.replace(".", "")
        padded = bare + "X" * (6 - len(bare))
        for char, meaning in sevens.items():
            code = padded[:3] + "." + padded[3:] + char
            out[code] = f"{desc}, {meaning}"


def main(argv):
    with zipfile.ZipFile(wheel_path(argv)) as wheel:
        root = ET.fromstring(wheel.read(XML))
    codes = {}
    for chapter in root.iter("chapter"):
        for section in chapter.iter("section"):
            # Blocks are codes too ("D55-D59": "Nutritional anemias").
            codes[section.get("id")] = " ".join(section.findtext("desc").split())
            for diag in section.findall("diag"):
                walk(diag, None, codes)
    text = "".join(f"{code}\t{desc}\n" for code, desc in sorted(codes.items()))
    assert "\t" not in "".join(codes.values()) and "\n" not in "".join(codes.values())
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0, compresslevel=9) as f:
        f.write(text.encode("utf-8"))
    with open(OUT, "wb") as f:
        f.write(buffer.getvalue())
    print(f"{len(codes)} codes, {len(buffer.getvalue())} bytes compressed -> {OUT}")


if __name__ == "__main__":
    main(sys.argv)
