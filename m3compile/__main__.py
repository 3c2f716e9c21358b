from m3compile.cli import main

main()
