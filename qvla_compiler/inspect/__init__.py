"""Looking at programs: the compile report, the `qvla inspect` / `qvla diff` views (terminal, JSON, HTML, DOT) and
per-phase graph dumps. Reads programs; never changes one."""
