"""Runs VBench's evaluation for `xattn-video vbench`, in whatever Python environment has the ``vbench`` package.

VBench (0.1.5 on PyPI) pins transformers==4.33.2 and numpy<2, so it usually lives in an environment of its own,
apart from this project's; this file therefore imports nothing from ``xattn_video`` and only the standard
library besides ``vbench``. ``xattn-video vbench`` writes a job file and runs ``PYTHON vbench_driver.py JOB``.

The job (JSON): cache_dir, device, videos_path, output_path, mode (vbench_standard | custom_input),
dimensions, prompt_file (custom_input: {file name: prompt}) and kwargs for VBench.evaluate. Each dimension is
evaluated on its own, as VBench names it: ``<output>/<dimension>_eval_results.json`` and
``<dimension>_full_info.json``; a dimension whose results file exists is skipped, so a killed run resumes.
Weights are read from the cache only (``local=True``); the caller has checked that they are all there.
"""

import json
import os
import sys


def main(job_path):
    with open(job_path, encoding="utf-8") as f:
        job = json.load(f)
    os.environ["VBENCH_CACHE_DIR"] = job["cache_dir"]  # read by vbench.utils at import time
    import torch
    from vbench import VBench

    package_dir = os.path.dirname(os.path.abspath(sys.modules["vbench"].__file__))
    full_info = job.get("full_info") or os.path.join(package_dir, "VBench_full_info.json")
    prompts = {}
    if job.get("prompt_file"):
        with open(job["prompt_file"], encoding="utf-8") as f:
            prompts = json.load(f)
    bench = VBench(torch.device(job["device"]), full_info, job["output_path"])
    for dimension in job["dimensions"]:
        done = os.path.join(job["output_path"], f"{dimension}_eval_results.json")
        if os.path.isfile(done):
            print(f"[xattn-video vbench] {dimension}: already evaluated ({done})", flush=True)
            continue
        print(f"[xattn-video vbench] {dimension}: evaluating {job['videos_path']}", flush=True)
        bench.evaluate(
            videos_path=job["videos_path"],
            name=dimension,
            prompt_list=prompts,
            dimension_list=[dimension],
            local=True,
            mode=job["mode"],
            **job.get("kwargs", {}),
        )
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: vbench_driver.py JOB.json", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
