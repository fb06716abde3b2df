#!/usr/bin/env bash
# make demo: generate the sample web (once), serve it on loopback, run the whole asset graph on every
# partition of its crawl, and print the summary.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
ensure_sample
ensure_sample_models
start_sample_server
# CURATION_COMPUTE=slurm (with CURATION_SLURM_* exported): the GPU stages run as SLURM jobs, in a job
# environment brought up to date with this checkout first.
if [ "${CURATION_COMPUTE:-local}" = slurm ]; then scripts/slurm-env.sh; fi
"$BIN/curation" run --crawl-root "$SAMPLE" --lake "$LAKE" --dagster-home "$DAGSTER_HOME" --allow-loopback
echo
"$BIN/curation" sql "$LAKE" "SELECT p.segment, count(*) AS pairs,
                                     count(*) FILTER (d.status = 'success') AS downloaded,
                                     count(*) FILTER (c.keep) AS clip_kept,
                                     count(*) FILTER (c.nsfw_tag <> 'UNLIKELY' OR c.punsafe > 0.5) AS unsafe_flagged,
                                     count(*) FILTER (c.pwatermark > 0.8) AS watermarked,
                                     round(avg(c.aesthetic), 2) AS mean_aesthetic,
                                     count(*) FILTER (x.survivor) AS dedupe_survivors
                              FROM pairs p JOIN downloads d USING (crawl, segment, uid)
                                   JOIN clip c USING (crawl, segment, uid)
                                   LEFT JOIN dedupe x USING (crawl, segment, uid)
                              GROUP BY ALL ORDER BY ALL"
echo
"$BIN/curation" subset list "$LAKE"
echo
echo 'curation index search "a drawing of a red circle":'
"$BIN/curation" index search "$LAKE" --text "a drawing of a red circle" -k 5 --spec "$CURATION_CLIP_SPEC"
cat <<TXT

Lake:        $LAKE   (query it: .venv/bin/curation sql $LAKE "SELECT * FROM pairs LIMIT 5")
Subsets:     $LAKE/subsets/<name>/release-NNNNNN/ (img2dataset parquet parts, webdataset shards, release.json)
Search:      .venv/bin/curation index search $LAKE --text "blue stars" --spec $CURATION_CLIP_SPEC [--json]
Dagster UI:  make ui, then open http://127.0.0.1:3000 (the demo's runs are in $DAGSTER_HOME)
TXT
