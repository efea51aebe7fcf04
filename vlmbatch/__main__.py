from vlmbatch.cli import main

main()
