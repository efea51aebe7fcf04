"""Review: the alt-text rules (`rules`) and the self-contained HTML pages people read the output in
(`report` for a job's output, `eval_report` for a benchmark's scores), rendered from Jinja2 templates."""
