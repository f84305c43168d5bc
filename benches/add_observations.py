#!/usr/bin/env python3
"""Adds Observations and DiagnosticReports, as Synthea writes them, to a bulk-export folder.

Real exports are mostly Observations (vital signs at every visit, lab results, surveys, social
history); the bundled Synthea sample has none. For every Encounter this writes, from its patient
and period:
  * vital signs: body height, body weight, BMI, heart rate, respiratory rate, body temperature
    (valueQuantity) and a blood-pressure panel (components for systolic and diastolic);
  * at two visits in three, a lab panel of three results (valueQuantity) and a DiagnosticReport
    that refers to them;
  * at one visit in four, a PHQ-2 survey score; at one in four, the tobacco smoking status
    (valueCodeableConcept);
which makes Observations about 60% of the rows. Output is deterministic (ids are UUIDv5 of the
encounter id and the code), so `replicate_bulk.py` can grow the result like the sample.

Usage: add_observations.py SRC_DIR DST_DIR   (DST gets a copy of SRC plus the new files)
"""

import json
import os
import random
import shutil
import sys
import uuid

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
NAMESPACE = uuid.UUID("6f1c2a4e-9a53-4a36-9d0e-1d3b2f6b7c11")

VITALS = [
    ("8302-2", "Body Height", "cm", 150.0, 195.0),
    ("29463-7", "Body Weight", "kg", 45.0, 120.0),
    ("39156-5", "Body mass index (BMI) [Ratio]", "kg/m2", 18.0, 38.0),
    ("8867-4", "Heart rate", "/min", 55.0, 110.0),
    ("9279-1", "Respiratory rate", "/min", 12.0, 20.0),
    ("8310-5", "Body temperature", "Cel", 36.1, 37.8),
]
LABS = [
    ("2339-0", "Glucose [Mass/volume] in Blood", "mg/dL", 65.0, 140.0),
    ("6299-2", "Urea nitrogen [Mass/volume] in Blood", "mg/dL", 7.0, 22.0),
    ("38483-4", "Creatinine [Mass/volume] in Blood", "mg/dL", 0.6, 1.4),
]
SMOKING = [
    ("266919005", "Never smoked tobacco (finding)"),
    ("8517006", "Ex-smoker (finding)"),
    ("449868002", "Smokes tobacco daily (finding)"),
]


def coding(code, display, system=LOINC):
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display}


def category(code, display):
    return [{"coding": [{"system": CATEGORY, "code": code, "display": display}]}]


def quantity(rng, unit, low, high):
    return {"value": round(rng.uniform(low, high), 1), "unit": unit, "system": UCUM, "code": unit}


class Writer:
    def __init__(self, encounter, rng):
        self.encounter = encounter
        self.rng = rng
        self.when = encounter["period"]["start"]
        self.subject = encounter["subject"]

    def id(self, code):
        return str(uuid.uuid5(NAMESPACE, f"{self.encounter['id']}/{code}"))

    def observation(self, code, display, cat, **value):
        resource = {
            "resourceType": "Observation",
            "id": self.id(code),
            "meta": {"profile": ["http://hl7.org/fhir/StructureDefinition/vitalsigns"]}
            if cat[0] == "vital-signs"
            else {"profile": ["http://hl7.org/fhir/us/core/StructureDefinition/us-core-observation-lab"]},
            "status": "final",
            "category": category(*cat),
            "code": coding(code, display),
            "subject": self.subject,
            "encounter": {"reference": f"Encounter/{self.encounter['id']}"},
            "effectiveDateTime": self.when,
            "issued": self.when,
        }
        resource.update(value)
        return resource

    def visit(self, index):
        rng = self.rng
        vitals = ("vital-signs", "Vital signs")
        out = [
            self.observation(code, display, vitals, valueQuantity=quantity(rng, unit, low, high))
            for code, display, unit, low, high in VITALS
        ]
        out.append(
            self.observation(
                "85354-9",
                "Blood pressure panel with all children optional",
                vitals,
                component=[
                    {
                        "code": coding("8480-6", "Systolic Blood Pressure"),
                        "valueQuantity": quantity(rng, "mm[Hg]", 100, 150),
                    },
                    {
                        "code": coding("8462-4", "Diastolic Blood Pressure"),
                        "valueQuantity": quantity(rng, "mm[Hg]", 60, 95),
                    },
                ],
            )
        )
        reports = []
        if index % 3 != 2:
            labs = [
                self.observation(code, display, ("laboratory", "laboratory"),
                                 valueQuantity=quantity(rng, unit, low, high))
                for code, display, unit, low, high in LABS
            ]
            out.extend(labs)
            reports.append({
                "resourceType": "DiagnosticReport",
                "id": self.id("51990-0"),
                "meta": {"profile": ["http://hl7.org/fhir/us/core/StructureDefinition/us-core-diagnosticreport-lab"]},
                "status": "final",
                "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074",
                                          "code": "LAB", "display": "Laboratory"}]}],
                "code": coding("51990-0", "Basic metabolic panel - Blood"),
                "subject": self.subject,
                "encounter": {"reference": f"Encounter/{self.encounter['id']}"},
                "effectiveDateTime": self.when,
                "issued": self.when,
                "result": [{"reference": f"Observation/{lab['id']}", "display": lab["code"]["text"]}
                           for lab in labs],
            })
        if index % 4 == 0:
            out.append(self.observation(
                "55758-7", "Patient Health Questionnaire 2 item (PHQ-2) total score [Reported]",
                ("survey", "Survey"),
                valueQuantity={"value": float(rng.randint(0, 6)), "unit": "{score}",
                               "system": UCUM, "code": "{score}"},
            ))
        if index % 4 == 1:
            code, display = rng.choice(SMOKING)
            out.append(self.observation(
                "72166-2", "Tobacco smoking status", ("social-history", "Social History"),
                valueCodeableConcept=coding(code, display, "http://snomed.info/sct"),
            ))
        return out, reports


def main(src, dst):
    if os.path.exists(dst):
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    rng = random.Random(20261207)
    observations, reports = [], []
    with open(os.path.join(src, "Encounter.000.ndjson"), encoding="utf8") as f:
        encounters = [json.loads(line) for line in f if line.strip()]
    for index, encounter in enumerate(encounters):
        obs, rep = Writer(encounter, rng).visit(index)
        observations.extend(obs)
        reports.extend(rep)
    for name, rows in (("Observation", observations), ("DiagnosticReport", reports)):
        with open(os.path.join(dst, f"{name}.000.ndjson"), "w", encoding="utf8") as f:
            for row in rows:
                f.write(json.dumps(row, separators=(",", ":")) + "\n")
    total = sum(1 for name in os.listdir(dst) if name != "log.ndjson"
                for line in open(os.path.join(dst, name), encoding="utf8") if line.strip())
    print(f"{len(observations)} Observations ({100 * len(observations) / total:.0f}% of {total} rows), "
          f"{len(reports)} DiagnosticReports", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
