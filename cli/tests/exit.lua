-- os.exit's status must become the program's exit status.
os.exit(3)
