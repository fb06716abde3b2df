"""The sample world: a generated miniature of a Common Crawl crawl with ground truth (`web`), its loopback
server (`server`), and the models trained on it (`toy_clip`, `models`) for the demo and the tests.

Nothing outside this package imports it (tests/test_architecture.py): the stages run on real crawls and real
checkpoints; only the CLI's sample commands load it, lazily.
"""
