from optserver.cli import main

main()
