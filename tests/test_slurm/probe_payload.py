"""Payload of the SLURM tests' `probe` asset: sleep, then report a materialization or raise.

Extras: seconds (how long to sleep), fail_with (a message to raise with; empty: succeed). It imports only
`dagster_pipes`, like the project's payloads.
"""

import os
import sys
import time

from dagster_pipes import open_dagster_pipes


def main() -> None:
    with open_dagster_pipes() as pipes:
        seconds = float(pipes.extras.get("seconds", 0))
        pipes.log.info(f"probe: sleeping {seconds:g} s in job {os.environ.get('SLURM_JOB_ID')}")
        time.sleep(seconds)
        message = pipes.extras.get("fail_with")
        if message:
            print(f"probe stderr: {message}", file=sys.stderr, flush=True)
            raise RuntimeError(message)
        pipes.report_asset_materialization(metadata={
            "slept_s": {"raw_value": seconds, "type": "float"},
            "job_from_inside": {"raw_value": os.environ.get("SLURM_JOB_ID", ""), "type": "text"},
        })


if __name__ == "__main__":
    main()
