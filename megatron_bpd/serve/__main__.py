from megatron_bpd.serve.cli import main

if __name__ == "__main__":
    main()
