"""fio-style benchmarks of datafs next to the local disk, the object store's
own ceiling and JuiceFS, measured side by side in one run.

`python -m benchmarks run [--quick|--tiny] [--out DIR] [--peers juicefs]`
starts a SeaweedFS S3 server on loopback, mounts datafs (and JuiceFS) with
their own state in a throwaway work dir, runs the workloads of issue 5, tears
everything down and writes results.json, results.md and PNG charts. Absolute
figures on a shared machine mean little; the ratios next to the disk, the
object-store ceiling and JuiceFS, taken in the same run, are the point.

Modules: `sizes` (modes), `results` (workload catalogue, ratios), `fio`,
`objstore` (the S3 ceiling), `system` (page cache, mounts, processes),
`targets` (disk, datafs, JuiceFS lifecycles), `workloads`, `harness` (the run
and its cleanup), `report` (JSON, Markdown, charts).
"""
