#!/usr/bin/env python3
"""A synthetic job catalog and queries for the job-search example (seeded, no download).

Postings look like the real thing in the ways that matter to scoring and compression: a
title, a company, a location, a handful of skills, and a long multi-sentence description in
which the few facts a search matches on are buried among boilerplate about the company,
benefits and process. Every posting is built from one ``random.Random(seed)``, so the same
seed gives the same catalog on every machine.

    python examples/job_search/catalog.py --items 300 --output catalog.jsonl

writes ``{"id", "text", "title", "location", "skills"}`` per line (``id`` and ``text`` are what
``slmserve score`` and ``slmserve compress`` read).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from typing import Any

FAMILIES: dict[str, tuple[list[str], list[str]]] = {
    "software": (
        [
            "Backend Engineer",
            "Python Developer",
            "Full-Stack Engineer",
            "Site Reliability Engineer",
        ],
        ["Python", "Go", "Kubernetes", "PostgreSQL", "AWS", "Django", "gRPC", "Terraform"],
    ),
    "data": (
        ["Data Engineer", "Machine Learning Engineer", "Data Scientist", "Analytics Engineer"],
        ["Python", "Spark", "SQL", "Airflow", "PyTorch", "dbt", "Kafka", "statistics"],
    ),
    "design": (
        ["Product Designer", "UX Researcher", "Visual Designer"],
        ["Figma", "user research", "prototyping", "design systems", "accessibility"],
    ),
    "hospitality": (
        ["Line Cook", "Sous Chef", "Restaurant Manager", "Barista"],
        ["food safety", "menu planning", "inventory", "team leadership", "pastry"],
    ),
    "health": (
        ["Registered Nurse", "Pharmacist", "Physiotherapist"],
        ["patient care", "triage", "electronic health records", "rehabilitation"],
    ),
    "sales": (
        ["Account Executive", "Sales Development Representative", "Customer Success Manager"],
        ["CRM", "negotiation", "B2B sales", "Salesforce", "forecasting"],
    ),
}
SENIORITY = ["Junior", "", "Senior", "Lead", "Staff"]
COMPANIES = [
    "Northwind Labs", "Bluefin Analytics", "Copperleaf Health", "Harbor & Vine", "Quartz Systems",
    "Maple Street Bistro", "Orbital Retail", "Tidewater Logistics", "Fernhill Clinics",
    "Lumen Finance", "Atlas Robotics", "Greenway Foods",
]  # fmt: skip
LOCATIONS = [
    "Berlin, Germany", "Lyon, France", "Amsterdam, Netherlands", "Austin, Texas",
    "Toronto, Canada", "London, United Kingdom", "Madrid, Spain", "Remote (Europe)",
    "Remote (US time zones)", "Dublin, Ireland",
]  # fmt: skip

COMPANY_LINES = [
    "{company} was founded over a decade ago and has grown steadily since then.",
    "At {company} we believe that great work comes from curious, kind people.",
    "{company} serves customers in more than twenty countries across three continents.",
    "Our team at {company} values clear writing, ownership and a sustainable pace.",
    "We are proud of our inclusive culture and our long-standing community partnerships.",
    "{company} recently opened a new office and is expanding several teams this year.",
]
ROLE_LINES = [
    "As a {title} you will work daily with {skill}.",
    "You will own projects end to end, from the first sketch to production, using {skill}.",
    "A typical week includes planning with your team, hands-on work with {skill}, and reviews.",
    "You will mentor colleagues and help us raise the bar on {skill}.",
    "You will partner with stakeholders to turn vague problems into shipped results with {skill}.",
]
REQUIREMENT_LINES = [
    "You have {years} or more years of professional experience with {skill}.",
    "Solid knowledge of {skill} is required; experience with {skill2} is a strong plus.",
    "You communicate clearly in English; other languages are welcome.",
    "You are comfortable working in a fast-moving environment with changing priorities.",
]
BENEFIT_LINES = [
    "We offer a competitive salary, a yearly learning budget and flexible hours.",
    "Benefits include health insurance, generous parental leave and a pension plan.",
    "You get thirty days of paid holiday plus public holidays.",
    "We provide a modern workplace, good coffee and a yearly team retreat.",
    "Our hiring process has three short interviews and we answer every application.",
]

QUERIES = [
    "senior python backend engineer, remote in europe",
    "data engineer with spark and airflow in berlin",
    "sous chef position in lyon, french cuisine",
    "machine learning engineer pytorch",
    "nurse job in dublin with patient care experience",
    "b2b account executive salesforce london",
]


def posting(rng: random.Random, index: int) -> dict[str, Any]:
    """One posting: structured fields plus a long description that buries them."""
    titles, skills_pool = FAMILIES[rng.choice(list(FAMILIES))]
    title = " ".join(x for x in (rng.choice(SENIORITY), rng.choice(titles)) if x)
    company = rng.choice(COMPANIES)
    location = rng.choice(LOCATIONS)
    skills = rng.sample(skills_pool, k=min(len(skills_pool), rng.randint(3, 5)))
    salary = rng.randrange(30, 160, 5)

    def fill(line: str) -> str:
        return line.format(
            company=company,
            title=title,
            skill=rng.choice(skills),
            skill2=rng.choice(skills),
            years=rng.randint(1, 8),
        )

    sentences = [
        f"{title} at {company}.",
        *(fill(x) for x in rng.sample(COMPANY_LINES, k=rng.randint(2, 4))),
        *(fill(x) for x in rng.sample(ROLE_LINES, k=rng.randint(2, 4))),
        *(fill(x) for x in rng.sample(REQUIREMENT_LINES, k=rng.randint(2, 4))),
        *(fill(x) for x in rng.sample(BENEFIT_LINES, k=rng.randint(2, 4))),
    ]
    text = " ".join(sentences) + (
        f"\nLocation: {location} | Salary: {salary}k | Skills: {', '.join(skills)}"
    )
    return {
        "id": f"job-{index:05d}",
        "text": text,
        "title": title,
        "location": location,
        "skills": skills,
    }


def make_catalog(n: int, seed: int = 0) -> list[dict[str, Any]]:
    if n < 1:
        raise ValueError(f"the catalog needs at least one item, got {n}")
    rng = random.Random(seed)
    return [posting(rng, i) for i in range(n)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=300, help="number of postings")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="JSONL file (default: standard output)")
    parser.add_argument("--queries", action="store_true", help="print the queries instead")
    args = parser.parse_args(argv)
    if args.queries:
        print("\n".join(QUERIES))
        return 0
    if args.items < 1:
        parser.error("--items must be at least 1")
    lines = "".join(json.dumps(p) + "\n" for p in make_catalog(args.items, args.seed))
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(lines)
    else:
        sys.stdout.write(lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
