# mlcls-ray: `make demo` and `make test` build .venv from nothing on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DIR := demo_data
DEMO_OUT := output/demo

.PHONY: demo demo-data test bench lock clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $@

demo-data: $(VENV)/.installed
	rm -rf $(DEMO_DIR)
	$(PY) -m mlcls_ray.data.synthetic $(DEMO_DIR) --num-images 3000

demo: demo-data
	$(VENV)/bin/mlcls -c PP-LCNet_x1_0_ML -o Global.mode=check_dataset \
		-o Global.dataset_dir=$(DEMO_DIR) -o Global.output=$(DEMO_OUT) \
		-o CheckDataset.convert.enable=True -o CheckDataset.convert.src_dataset_type=COCO \
		-o CheckDataset.split.enable=True -o CheckDataset.split.train_percent=80 -o CheckDataset.split.val_percent=20

test: $(VENV)/.installed
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) jobs/bench_check.py --memory 20000
	$(PY) jobs/bench_manifest.py

lock: $(VENV)/.installed
	(echo "# Pins of everything that passed make test here. Regenerate with: make lock"; \
	 $(VENV)/bin/pip freeze --exclude-editable) > constraints.txt

clean:
	rm -rf $(VENV) $(DEMO_DIR) output bench_data
