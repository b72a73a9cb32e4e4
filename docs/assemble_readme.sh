#!/usr/bin/env bash
# README.md is assembled from docs/readme/*.md in a fixed order, so each area keeps its section.
set -euo pipefail
cd "$(dirname "$0")/readme"
order=(intro.md api.md faces.md performance.md docker.md page.md training.md licences.md)
{
  for f in "${order[@]}"; do
    [ -f "$f" ] || continue
    cat "$f"
    echo
  done
} > ../../README.md
