.PHONY: test style quality slow

test:
	python -m pytest -q -p no:cacheprovider

slow:
	python -m pytest -q -m slow

style:
	ruff format src tests benchmarks scripts
	ruff check --fix src tests benchmarks scripts

quality:
	ruff format --check src tests benchmarks scripts
	ruff check src tests benchmarks scripts
