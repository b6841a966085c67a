from services.triton.launcher import main

main()
