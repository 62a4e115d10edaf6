"""Commands around the stages, none of them training: preview.py shows how a record is rendered and
labelled, convert.py writes instruction data as ShareGPT, synthetic.py generates the shipped
learnable sample data, pipeline_config.py reads and checks run_pipeline.sh's YAML config.
"""
