"""spark-submit entry point of data_prep (spark-submit runs a file, not ``-m``); docs/SPARK.md.

    spark-submit --master yarn --driver-memory 32g --executor-memory 16g \
      --conf spark.pyspark.python=/shared/lmrec/.venv/bin/python \
      launch/spark/data_prep.py --config configs/data_prep/<job>.yaml engine=spark

Exactly ``python -m data_prep`` (lmrec must be installed in the Python that runs it: pip install -e '.[spark]');
leave spark_master empty so that spark-submit's --master is used.
"""

import runpy

runpy.run_module("data_prep", run_name="__main__", alter_sys=True)
