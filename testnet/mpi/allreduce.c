/*
 * Reference benchmark: MPI_Allreduce(SUM) of float32 vectors, for HPC users'
 * point of comparison (testnet bench --mpi). Run under mpirun with one rank per
 * peer; testnet bench pins Open MPI to its TCP transport on loopback.
 *
 * For each size every rank does --warmup untimed all-reduces, then --rounds
 * timed ones, each after a barrier; a round's time is that of the slowest rank.
 * Rank 0 prints one JSON line per size on stdout:
 *
 *   {"size": N, "peers": P, "median_s": ..., "min_s": ..., "rounds": R, "mpi": "..."}
 *
 * Everything else goes to stderr. Exits non-zero (and aborts the job) if a
 * reduced vector is wrong.
 *
 *   mpirun -np 4 allreduce --sizes 1048576,16777216,67108864 --rounds 5
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Small integer pattern: every sum stays exactly representable in float32. */
#define MODULUS 251
#define MAX_SIZES 16

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void usage(int rank) {
    if (rank == 0)
        fprintf(stderr, "usage: allreduce [--sizes N,N,...] [--rounds R] [--warmup W]\n");
    MPI_Abort(MPI_COMM_WORLD, 2);
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank, peers;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &peers);

    long sizes[MAX_SIZES] = {1L << 20, 1L << 24, 1L << 26};
    int nsizes = 3, rounds = 5, warmup = 1;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--sizes") && i + 1 < argc) {
            nsizes = 0;
            for (char *s = strtok(argv[++i], ","); s; s = strtok(NULL, ",")) {
                char *end;
                long v = strtol(s, &end, 10);
                if (*end || v < 1 || nsizes == MAX_SIZES) usage(rank);
                sizes[nsizes++] = v;
            }
            if (nsizes == 0) usage(rank);
        } else if (!strcmp(argv[i], "--rounds") && i + 1 < argc) {
            rounds = atoi(argv[++i]);
        } else if (!strcmp(argv[i], "--warmup") && i + 1 < argc) {
            warmup = atoi(argv[++i]);
        } else {
            usage(rank);
        }
    }
    if (rounds < 1 || warmup < 0) usage(rank);

    char version[MPI_MAX_LIBRARY_VERSION_STRING];
    int vlen;
    MPI_Get_library_version(version, &vlen);
    /* The first line only, without quotes or control characters, for the JSON. */
    for (int i = 0; i < vlen; i++)
        if (version[i] == '\n' || version[i] == ',' || version[i] == '"' || version[i] < ' ') {
            version[i] = 0;
            break;
        }

    double *times = malloc(sizeof(double) * rounds);
    double *slowest = malloc(sizeof(double) * rounds);
    for (int k = 0; k < nsizes; k++) {
        long n = sizes[k];
        float *src = malloc(sizeof(float) * n), *buf = malloc(sizeof(float) * n);
        if (!src || !buf || !times || !slowest) {
            fprintf(stderr, "allreduce: rank %d: out of memory for %ld values\n", rank, n);
            MPI_Abort(MPI_COMM_WORLD, 1);
        }
        /* Rank r holds (i mod M) + r, so the sum at i is P*(i mod M) + P(P-1)/2. */
        for (long i = 0; i < n; i++) src[i] = (float)(i % MODULUS + rank);
        for (int r = 0; r < warmup + rounds; r++) {
            memcpy(buf, src, sizeof(float) * n); /* in place: restart from the inputs */
            MPI_Barrier(MPI_COMM_WORLD);
            double t0 = MPI_Wtime();
            MPI_Allreduce(MPI_IN_PLACE, buf, (int)n, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
            double dt = MPI_Wtime() - t0;
            for (long i = 0; i < n; i++) {
                float want = (float)(peers * (i % MODULUS) + peers * (peers - 1) / 2);
                if (buf[i] != want) {
                    fprintf(stderr, "allreduce: rank %d: WRONG result, size %ld, index %ld: got %f, expected %f\n",
                            rank, n, i, buf[i], want);
                    MPI_Abort(MPI_COMM_WORLD, 3);
                }
            }
            if (r >= warmup) times[r - warmup] = dt;
        }
        MPI_Reduce(times, slowest, rounds, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);
        if (rank == 0) {
            qsort(slowest, rounds, sizeof(double), cmp_double);
            printf("{\"size\": %ld, \"peers\": %d, \"median_s\": %.9f, \"min_s\": %.9f, \"rounds\": %d, \"mpi\": \"%s\"}\n",
                   n, peers, slowest[rounds / 2], slowest[0], rounds, version);
            fflush(stdout);
        }
        free(src);
        free(buf);
    }
    free(times);
    free(slowest);
    MPI_Finalize();
    return 0;
}
