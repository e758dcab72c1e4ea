from adaptool.cli import main

main()
