"""Drafters, one file per method, behind `skipjack.drafters.base` (`Drafter`: what a method learned and its
resources; `DraftSession`: one request's drafting). The registry that names them is `skipjack.methods`."""
