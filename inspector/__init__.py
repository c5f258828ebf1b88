"""Projection Inspector's Gradio app: a view over the `projection` core that holds no projection logic.

    python app.py                      # the built-in demo pair
    python app.py --teacher T --student S [--strategy F] [--root DIR]
"""
