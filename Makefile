# mlcls-ray: `make demo` and `make test` build .venv from nothing on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DIR := demo_data
DEMO_OUT := output/demo
# a small timm backbone from scratch (no hub needed), two Ray Train workers on CPU, about ten minutes; the generic
# recipe's defaults (from scratch: constant rate, no warm-up) but no EMA, which would still be near its random start
DEMO_MODEL := resnet18_ML
DEMO_TRAIN := -o Global.dataset_dir=$(DEMO_DIR) -o Global.output=$(DEMO_OUT) -o Global.device=cpu \
	-o Train.num_workers=2 -o Train.image_size=64 -o Train.batch_size=32 -o Train.epochs_iters=8 \
	-o Train.augment=light -o Train.ema_decay=0

.PHONY: demo demo-data audit-demo test bench lock clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $@

demo-data: $(VENV)/.installed
	rm -rf $(DEMO_DIR)
	$(PY) -m mlcls_ray.data.digits $(DEMO_DIR) --num-train 2400 --num-val 600

demo: demo-data
	rm -rf $(DEMO_OUT)  # the demo's own output: a rerun trains a new model, and labels refuse another model's output
	$(VENV)/bin/mlcls -c PP-LCNet_x1_0_ML -o Global.mode=check_dataset \
		-o Global.dataset_dir=$(DEMO_DIR) -o Global.output=$(DEMO_OUT) \
		-o CheckDataset.convert.enable=True -o CheckDataset.convert.src_dataset_type=COCO \
		-o CheckDataset.split.enable=True -o CheckDataset.split.train_percent=80 -o CheckDataset.split.val_percent=20
	$(VENV)/bin/mlcls -c $(DEMO_MODEL) -o Global.mode=train $(DEMO_TRAIN)
	$(VENV)/bin/mlcls -c $(DEMO_MODEL) -o Global.mode=evaluate $(DEMO_TRAIN)
	$(VENV)/bin/mlcls -c $(DEMO_MODEL) -o Global.mode=label $(DEMO_TRAIN) \
		-o Label.input=$(DEMO_DIR)/images -o Label.output=$(DEMO_OUT)/labels
	$(PY) jobs/compare_labels.py $(DEMO_OUT)/labels $(DEMO_DIR)

# the label audit on the demo set: 3 folds of the demo's recipe (about 20 minutes on 2 cores; fewer epochs leave
# models too weak to audit with); open output/demo/audit/review.html, then apply its downloaded decisions with
# -o Audit.apply=audit_decisions.csv
audit-demo: demo-data
	$(VENV)/bin/mlcls -c $(DEMO_MODEL) -o Global.mode=audit $(DEMO_TRAIN) -o Audit.folds=3

test: $(VENV)/.installed
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) jobs/bench_accuracy.py
	$(PY) jobs/bench_audit.py
	$(PY) jobs/bench_check.py --memory 20000
	$(PY) jobs/bench_manifest.py
	$(PY) jobs/bench_metrics.py --classes 4000 --baseline-classes 1000
	$(PY) jobs/bench_listing.py
	$(PY) jobs/bench_train.py
	$(PY) jobs/bench_label.py
	$(PY) jobs/bench_serve.py

lock: $(VENV)/.installed
	(echo "# Pins of everything that passed make test here. Regenerate with: make lock"; \
	 $(VENV)/bin/pip freeze --exclude-editable) > constraints.txt

clean:
	rm -rf $(VENV) $(DEMO_DIR) output bench_data
