"""`skipjack eval`: what a method costs in quality, measured on one harness (`harness`), with local text
(`texts`), a HumanEval runner (`humaneval`, in `skipjack.sandbox`) and a small self-checking task for models
too small for HumanEval (`selfcheck`)."""
