"""Analysis tools on top of the benchmark: the copy oracle's bound (`headroom`), the clean/looping split
(`loops`), bf16 against fp32 quality (`quality`) and the linear layers timed by rows (`rows`)."""
