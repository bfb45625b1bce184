"""Studies: each a package (``plan``, ``execution``, ``summary``...) that
declares one ``STUDY = runner.Study(...)``, run by the one runner
(``runner.run_study``). A study imports the shared modules here (``runner``,
``sources``, ``stats``, ``report``...) and capabilities, never another study.
"""
