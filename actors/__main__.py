from actors.cli import actors_main


def main() -> int:
    return actors_main()


if __name__ == "__main__":
    raise SystemExit(main())
