"""Start Projection Inspector: `python app.py [--teacher T --student S --strategy F --expert E --root DIR]`."""
from inspector.cli import main

if __name__ == "__main__":
    main()
