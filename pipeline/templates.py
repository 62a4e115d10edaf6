"""Alias kept for users' scripts: `pipeline.templates.render` and friends live in
pipeline/data/templates.py."""

from pipeline.data.templates import chat_template_jinja, get_template, render, template_names

__all__ = ["chat_template_jinja", "get_template", "render", "template_names"]
